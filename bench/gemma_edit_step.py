"""Seconds per step of the Gemma recipe's edit (``edit.finetune``: NPO on the forget facts, NLL
on retain facts, KL to the unedited model on retain text; batch 8 each), the old path against
the fast one, measured in one run:

    OMP_NUM_THREADS=1 python bench/gemma_edit_step.py             # torch threads: 1
    OMP_NUM_THREADS=2 python bench/gemma_edit_step.py --threads 2

"before" is ``edit.finetune._train(..., fast=False)``: the path every backend took until now,
kept behind that flag (the whole selected matrices get dense gradients, masked; the text KL
runs the unedited model at every step and unembeds every text position of both models).
"after" is the default (``fast=True``): on a Hugging Face model the selected rows / columns of
each ``nn.Linear`` train as small deltas (``edit.finetune.SliceCopy``) and the KL reference
is computed once up front (``ModelHandle.kl_reference``: per text position a d_model vector,
exact). Units: the top 2% of MLP neurons by a seeded random draw (as many per model as the
recipe's Fisher top 2%: 737 of 36,864); the data: data/gemma_facts.jsonl after screening.

Per step = (time of ``steps`` steps - time of 1 step) / (``steps`` - 1), so the one-off setup
(the private copy, the KL reference) is reported apart; and the median of the steps' own wall
seconds inside the training loop (``TrainResult.seconds``), which a noisy setup (the KL
reference, ~20 s, recomputed in each run) does not move. Wall and process CPU seconds: on a
shared machine the CPU time is the steadier number. Needs the gemma extra.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def timed(fn) -> tuple[float, float, object]:
    """Wall and process CPU seconds of ``fn()``, and its value."""
    w, c = time.perf_counter(), time.process_time()
    value = fn()
    return time.perf_counter() - w, time.process_time() - c, value


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from edit._common import unit_slices
    from edit.finetune import FinetuneSettings, _train
    from excise.hf import load_model
    from excise.request import ForgetRequest
    from excise.sites import Selection, Unit
    from probes import screen_known

    h = load_model("gemma3-270m", log=lambda s: None)
    req, _ = screen_known(h, ForgetRequest.from_jsonl(ROOT / "data/gemma_facts.jsonl"),
                          log=lambda s: None)
    g = torch.Generator().manual_seed(0)
    n_mlp = h.info("blocks.0.mlp.post").unit_shape[0]
    picks = torch.randperm(h.n_layers * n_mlp, generator=g)[:round(0.02 * h.n_layers * n_mlp)]
    units = Selection([Unit(f"blocks.{int(i) // n_mlp}.mlp.post", (int(i) % n_mlp,))
                       for i in picks])
    _, slices = unit_slices("finetune", h, None, units, 0.02)
    print(f"{len(units)} neurons, {sum(v.numel() for v in slices.values()):,} parameters "
          f"trained; {len(req.forget)} forget, {len(req.retain)} retain facts, "
          f"{len(req.retain_text)} retain-text lines; threads {torch.get_num_threads()}",
          flush=True)
    out = {}
    for label, fast in (("before", False), ("after", True)):
        runs = {}
        for steps in (1, args.steps):
            st = FinetuneSettings(method="npo", beta=1.0, lr=1e-4, steps=steps, batch_size=8,
                                  text_weight=1.0, text_loss="kl")
            runs[steps] = timed(lambda: _train(h, slices, req, st, progress=False, fast=fast))
        per = tuple((runs[args.steps][i] - runs[1][i]) / (args.steps - 1) for i in (0, 1))
        setup = tuple(runs[1][i] - per[i] for i in (0, 1))
        inside = runs[args.steps][2].result.seconds  # train's own per-step wall seconds
        median = statistics.median(inside)
        out[label] = per + (median,)
        print(f"{label:6s}: {per[0]:.2f} s/step wall, {per[1]:.2f} s/step CPU (difference of "
              f"the {args.steps}- and 1-step runs); inside the loop (train's per-step seconds) "
              f"median {median:.2f} s, {min(inside):.2f}-{max(inside):.2f}; setup "
              f"{setup[0]:.1f} s wall, {setup[1]:.1f} s CPU", flush=True)
    b, a = out["before"], out["after"]
    print(f"speed-up per step: {b[0] / a[0]:.2f}x wall, {b[1] / a[1]:.2f}x CPU, "
          f"{b[2] / a[2]:.2f}x by the in-loop medians (threads {torch.get_num_threads()}; "
          f"machine shared)")


if __name__ == "__main__":
    main()
