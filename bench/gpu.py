"""excise on a GPU in bfloat16 against the CPU in float32: one prepared run (under 10 minutes).

    python bench/gpu.py                      # cuda/bfloat16 vs cpu/float32, both models
    python bench/gpu.py --smoke              # tiny shapes, CPU only: checks the script itself
    python bench/gpu.py --out $OUT/gpu.json  # also write the numbers as JSON

Two models, both randomly initialised (speed does not depend on what the weights learned, and a
GPU machine here has no network and takes at most 64 MiB of carried files, so neither Gemma's
package nor a trained organism travels):
- ``gemma3-shaped``: a ``Gemma3ForCausalLM`` built from Gemma 3 270M's configuration (18 layers,
  d_model 640, 4 heads of 256, one KV head, d_mlp 2048, vocabulary 262,144) behind an
  :class:`excise.hf.HFHandle`, with facts of random words;
- ``medium``: the ``medium`` organism's TransformerLens model (6 layers, d_model 384, d_mlp
  1536) with the medium world's facts (the organism's request, 16 forget + 64 retain facts).

For each: the placement (``ModelHandle.to``), a target-only forward, Fisher, gradient ratio,
activations, attribution patching, exact causal tracing (a few prompts), dampening plus its
exact revert, and 10 steps of masked fine-tuning - wall time per step on each side (CUDA
synchronised), their ratio, and for the GPU run the peak CUDA memory as a multiple of the
weights' bytes. Checks on the way: every revert is bit-exact, every score is finite and
float32, and the GPU's forget-set log-probabilities agree with the CPU's within bfloat16's
precision (the largest difference is printed).

On a lent H200 (torch 2.11, no transformer-lens / sae-lens / nnsight / python-sat there): carry
their wheels as the device tool's README explains, then ``pip install --target`` them and run
this script from the repository root with that folder on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch


def gemma3_shaped(device, dtype, smoke: bool):
    """A random Gemma-3-270M-shaped HF model with a word tokenizer, and a request of random
    words (prompts of 6-9 words, one-word targets)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast

    from excise.hf import HFHandle
    from excise.request import ForgetRequest

    words = ["<pad>", "<bos>", "<unk>"] + [f"w{i}" for i in range(2000)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", pad_token="<pad>",
                                  unk_token="<unk>")
    shape = dict(num_hidden_layers=18, hidden_size=640, num_attention_heads=4,
                 num_key_value_heads=1, head_dim=256, intermediate_size=2048,
                 vocab_size=262_144, sliding_window=512, max_position_embeddings=32_768)
    if smoke:
        shape.update(num_hidden_layers=2, hidden_size=64, head_dim=16, intermediate_size=128,
                     vocab_size=len(words))
    cfg = Gemma3TextConfig(**shape, bos_token_id=1, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(cfg)
    g = torch.Generator().manual_seed(1)

    def facts(n):
        out = []
        for _ in range(n):
            k = int(torch.randint(6, 10, (1,), generator=g))
            ids = torch.randint(3, len(words), (k + 1,), generator=g).tolist()
            out.append((" ".join(words[i] for i in ids[:-1]), words[ids[-1]]))
        return out

    req = ForgetRequest.from_lists(forget=facts(16), retain=facts(64),
                                   general=[" ".join(f"w{i}" for i in range(j, j + 24))
                                            for j in range(0, 400, 50)])
    return HFHandle(model, tok, name="gemma3-shaped").to(device, dtype), req


def medium_shaped(device, dtype, smoke: bool):
    """The medium organism's model, randomly initialised, and its world's request."""
    from excise.handle import TLHandle
    from excise.organism import PRESETS, Organism, build_model
    from excise.world import Tokenizer, make_world

    p = PRESETS["tiny" if smoke else "medium"]
    world = make_world(p.n_people, p.n_holdout, seed=p.seed, n_filler=p.n_filler)
    tok = Tokenizer(world.vocabulary())
    handle = TLHandle(build_model(p, len(tok), n_ctx=32), tok, name=f"{p.name}-shaped")
    org = Organism(p, world, tok, handle, progress=False)
    req = org.request(forget_people=range(4), retain_people=range(4, 20))
    return handle.to(device, dtype), req


def timed(fn, device, repeat: int = 1):
    """Seconds per call (CUDA synchronised), after one warm-up call; and the last result."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out = fn()
    sync()
    t = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    sync()
    return (time.perf_counter() - t) / repeat, out


def steps(model, req, device, smoke: bool) -> tuple[dict, dict]:
    """Each step's seconds, and the checks made on the way."""
    import edit
    import locate

    f = req.forget
    batch = model.encode(f.facts if hasattr(f, "facts") else f)
    few = type(req).from_lists(forget=[(x.prompt, x.target) for x in list(f)[:2]],
                               retain=[(x.prompt, x.target) for x in list(req.retain)[:2]])
    mlp = "blocks.*.mlp.post"
    sec, checks = {}, {}
    with torch.inference_mode():
        sec["forward (target logprobs)"], lp = timed(lambda: model.target_logprobs(batch),
                                                     device, 3)
    checks["forget_logprobs"] = lp.float().cpu()
    runs = {
        "fisher": lambda: locate.fisher(model, req, sites=["blocks.*.mlp.W_in",
                                                           "blocks.*.mlp.W_out"]),
        "grad_ratio": lambda: locate.grad_ratio(model, req, sites=["blocks.*.mlp.W_in"]),
        "activations": lambda: locate.activations(model, req, sites=mlp),
        "attribution": lambda: locate.attribution(model, req, sites=mlp),
        "causal_trace (exact, 2 facts)": lambda: locate.causal_trace(model, few, mode="exact"),
    }
    imps = {}
    for name, fn in runs.items():
        sec[name], imps[name] = timed(fn, device)
        for site, s in imps[name].scores.items():
            if s.dtype not in (torch.float32, torch.float64) or not torch.isfinite(s).all():
                checks.setdefault("bad_scores", []).append(f"{name} {site} {s.dtype}")
    before = {k: v.clone() for k, v in model.named_parameters().items()}

    def dampen():
        with edit.dampen(model, imps["fisher"], alpha=10.0):
            pass

    sec["dampen + revert"], _ = timed(dampen, device)
    units = imps["activations"].top(0.02)

    def finetune():
        e = edit.finetune(model, imps["activations"], units, method="npo", steps=3 if smoke
                          else 10, lr=1e-4, request=req)
        e.revert()

    sec["finetune (npo, 10 steps) + revert"], _ = timed(finetune, device)
    changed = [k for k, v in model.named_parameters().items() if not torch.equal(v, before[k])]
    checks["revert_exact"] = not changed
    return sec, checks


def one_side(which: str, device, dtype, smoke: bool) -> dict:
    build = {"gemma3-shaped": gemma3_shaped, "medium": medium_shaped}[which]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    model, req = build(device, dtype, smoke)
    load = time.perf_counter() - t
    weights = sum(p.numel() * p.element_size() for p in model.named_parameters().values())
    sec, checks = steps(model, req, device, smoke)
    out = {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "build_s": load,
           "weights_mib": weights / 2**20, "seconds": sec, "checks": checks}
    if device.type == "cuda":
        out["cuda_peak_x_weights"] = torch.cuda.max_memory_allocated() / weights
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU only")
    ap.add_argument("--models", nargs="+", default=["medium", "gemma3-shaped"])
    ap.add_argument("--threads", type=int, default=None, help="CPU side's torch threads")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = torch.device("cuda") if torch.cuda.is_available() and not args.smoke else None
    sides = [("cpu", torch.device("cpu"), torch.float32)]
    sides.append(("gpu", gpu, torch.bfloat16) if gpu is not None else
                 ("cpu-bf16", torch.device("cpu"), torch.bfloat16))
    print(f"torch {torch.__version__}; threads {torch.get_num_threads()}; "
          f"GPU: {torch.cuda.get_device_name() if gpu is not None else 'none'}", flush=True)
    report = {}
    for which in args.models:
        res = {}
        for label, device, dtype in sides:
            try:
                res[label] = one_side(which, device, dtype, args.smoke)
            except Exception as e:  # one side failing still reports the other
                res[label] = {"error": f"{type(e).__name__}: {e}"}
            print(f"{which} {label}: "
                  + (res[label]["error"] if "error" in res[label] else
                     f"{res[label]['weights_mib']:.0f} MiB of weights, built in "
                     f"{res[label]['build_s']:.1f} s"), flush=True)
        a, b = (res[label] for label, _, _ in sides)
        if "error" not in a and "error" not in b:
            print(f"  {'step':38s} {sides[0][0]:>9s} {sides[1][0]:>9s}  ratio", flush=True)
            for step, s in a["seconds"].items():
                print(f"  {step:38s} {s:8.3f}s {b['seconds'][step]:8.3f}s "
                      f"{s / b['seconds'][step]:6.1f}x", flush=True)
            d = (a["checks"].pop("forget_logprobs") - b["checks"].pop("forget_logprobs")).abs()
            print(f"  forget log-prob difference: max {float(d.max()):.3g}, mean "
                  f"{float(d.mean()):.3g}; reverts exact: {a['checks']['revert_exact']} / "
                  f"{b['checks']['revert_exact']}; bad scores: "
                  f"{a['checks'].get('bad_scores', [])} / {b['checks'].get('bad_scores', [])}")
            if "cuda_peak_x_weights" in b:
                print(f"  CUDA peak memory: {b['cuda_peak_x_weights']:.1f}x the weights' bytes")
            res["max_logprob_diff"] = float(d.max())
        report[which] = res
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
