"""The TOFU-style fine-tune of Gemma 3 270M and its retrain oracle (excise.finetuned), measured.

Builds (or loads from the cache) the fine-tune and the oracle a config describes
(``model.finetune_world``, ``request.forget_people``; default configs/gemma-tofu.yaml) and
prints, for the base model, the fine-tune and the oracle: recall of the forget, retain,
paraphrase (held-out phrasings), holdout (never-trained people) and shared facts, and
perplexity on the request's general text (and on the world's filler text) against the base,
with a 90% bootstrap interval of each ratio over the general text's lines (the same resample
for every model; a line's weight is its token count).
Training times are those the cache recorded when the model was trained (wall and process CPU
seconds, at the spec's thread count); ``--attacks`` also runs the attack suite on the
fine-tune against the oracle with the attack grid ``--grid`` (default: full).

    python bench/gemma_tofu.py [--config configs/gemma-tofu.yaml] [--json out.json]
                               [--attacks --grid full]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import probes
from excise.config import load
from excise.finetuned import FinetuneWorld, finetuned, load_base
from probes.behaviour import token_logprobs_reader


@torch.inference_mode()
def line_nll(model, texts, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """``(summed negative log-likelihood, token count)`` of each line, read as
    :func:`probes.perplexity` reads them (every token after the first word), batched."""
    enc = model.encode_texts(list(texts))
    read = token_logprobs_reader(model, "serial", enc)
    nll, counts = [], []
    for b in enc.chunks(batch_size):
        nll.append(-read(b).sum(1).double())
        counts.append(b.target_mask[:, 1:].sum(1))
    return torch.cat(nll), torch.cat(counts)


def ratio_interval(nll, base_nll, counts, n_boot: int = 2000, seed: int = 0,
                   level: float = 0.9) -> tuple[float, float]:
    """Bootstrap interval of ``ppl(model) / ppl(base)`` over lines (resampled with
    replacement, token-weighted)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(counts), (n_boot, len(counts)), generator=g)
    diff = (nll - base_nll)[idx].sum(1) / counts[idx].sum(1).double()
    lo, hi = torch.quantile(diff.exp(), torch.tensor([(1 - level) / 2, (1 + level) / 2],
                                                     dtype=torch.double)).tolist()
    return round(lo, 4), round(hi, 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/gemma-tofu.yaml")
    ap.add_argument("--json", default=None, help="write the numbers here")
    ap.add_argument("--attacks", action="store_true", help="run the attack grid too")
    ap.add_argument("--grid", default="full")
    ap.add_argument("--no-oracle", action="store_true",
                    help="measure the base model and the fine-tune only (no oracle trained)")
    args = ap.parse_args()

    cfg = load(args.config)
    spec = FinetuneWorld.of(cfg.model.finetune_world)
    base_name = cfg.model.name or cfg.model.path
    print(f"{base_name}: {spec}")
    out: dict = {"spec": spec.to_dict(), "base": base_name}

    t0, c0 = time.time(), time.process_time()
    ft = finetuned(base_name, spec, progress=True)
    out["finetune_call"] = {"wall": round(time.time() - t0, 1),
                            "cpu": round(time.process_time() - c0, 1)}
    fp = cfg.request.forget_people
    req = ft.request(forget_people=range(fp) if isinstance(fp, int) else fp,
                     attributes=cfg.request.attributes)
    oracle = None
    if not args.no_oracle:
        t0, c0 = time.time(), time.process_time()
        oracle = ft.oracle(req)
        out["oracle_call"] = {"wall": round(time.time() - t0, 1),
                              "cpu": round(time.process_time() - c0, 1)}
    records = [("finetune", ft.record())]
    if oracle is not None:
        records.append(("oracle", ft.record(req.forget_people())))
    for name, rec in records:
        rec = rec or {}
        out[f"{name}_train"] = {"wall": rec.get("train_seconds"),
                                "cpu": rec.get("train_cpu_seconds"),
                                "threads": rec.get("threads"),
                                "final_loss": rec.get("final_loss")}
        print(f"{name}: trained in {rec.get('train_seconds')} s wall, "
              f"{rec.get('train_cpu_seconds')} s CPU at {rec.get('threads')} thread(s)")
    n_params = sum(ft.model.named_parameters()[s].numel() for s in ft.sites)
    out["trained_params"] = n_params
    out["params"] = ft.model.n_parameters()
    print(f"trained parameters: {n_params:,} of {ft.model.n_parameters():,} "
          f"({n_params / ft.model.n_parameters():.1%}): {ft.sites[0]} .. {ft.sites[-1]}")

    base = load_base(base_name)
    splits = {"forget": req.forget, "retain": req.retain, "paraphrase": req.paraphrase,
              "holdout": req.holdout, "shared": req.shared}
    filler = list(ft.world.filler_eval)
    rows = {}
    models = [("base", base), ("finetune", ft.model)] + \
        ([("oracle", oracle)] if oracle is not None else [])
    lines = {}
    for label, m in models:
        row = {k: round(probes.recall(m, v), 3) for k, v in splits.items() if len(v)}
        row["ppl_general"] = round(probes.perplexity(m, list(req.general)), 3)
        row["ppl_filler"] = round(probes.perplexity(m, filler), 3)
        rows[label] = row
        lines[label] = line_nll(m, list(req.general))
    for label in [k for k in rows if k != "base"]:
        for k in ("ppl_general", "ppl_filler"):
            rows[label][k + "_vs_base"] = round(rows[label][k] / rows["base"][k], 4)
        rows[label]["ppl_general_vs_base_90"] = ratio_interval(
            lines[label][0], lines["base"][0], lines["base"][1])
    out["general_lines"] = len(req.general)
    out["rows"] = rows
    keys = list(rows["base"])
    print(f"{'':10s}" + "".join(f"{k:>13s}" for k in keys))
    for label, row in rows.items():
        print(f"{label:10s}" + "".join(f"{row.get(k, float('nan')):13.3f}" for k in keys))
    print(f"ppl vs base (general text, held out of training, {len(req.general)} lines; 90% "
          f"interval over lines):", {k: (rows[k]["ppl_general_vs_base"],
                                         rows[k]["ppl_general_vs_base_90"])
                                     for k in rows if k != "base"})

    if args.attacks and oracle is not None:
        settings = dict(cfg.verify.params)
        settings["grid"] = args.grid
        t0, c0 = time.time(), time.process_time()
        rep = probes.verify(ft.model, req, oracle=oracle, label="after", suite="attacks",
                            original=base, **settings)
        out["attacks"] = {"metrics": rep.metrics, "wall": round(time.time() - t0, 1),
                          "cpu": round(time.process_time() - c0, 1), "grid": args.grid}
        print(json.dumps(out["attacks"], indent=1, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
