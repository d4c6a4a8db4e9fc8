"""locate speed, each ratio measured in one run on the same model and tokens.

    python bench/bench_locate.py [--preset auto|tiny|small] [--facts 8] [--repeats 3]

- Fisher (per-batch estimator, every parameter) time per batch / one forward pass (target <= 3.5x)
- exact causal tracing (each restoration resumes the corrupted run: keys and values reused)
  vs a plain loop of one forward per (component, layer, position) - excise's own reference
  loop; ``bench_peers.py`` compares against ROME's code (target >= 5x faster, same outputs)
- attribution patching vs exact tracing (target >= 20x faster) and the Spearman correlation of
  their (component, layer, position) cells over the traced prompts
- fact_lookup: attribution (one forward + backward per batch) vs exact patching (every neuron
  of block 0 patched at the subject's tokens, batched), ``--fast-facts`` forget and as many
  retain facts, and the Spearman correlation of their scores

``--preset auto`` uses the small organism when it is already in the cache (``EXCISE_CACHE``) and
the tiny one otherwise: this script never trains the small organism.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import excise  # noqa: E402
from excise.importance import spearman  # noqa: E402
from excise.organism import cache_dir  # noqa: E402
from locate import traces  # noqa: E402
from locate._grads import gradient_stats  # noqa: E402
from locate.causal_trace import prompts, subject_noise, window_layers  # noqa: E402

COMPS = ("resid_post", "mlp.out", "attn.out")


def _best(fn, repeats, warm=True):
    """Best of ``repeats`` timings after a warm-up (the CPU is shared: the minimum is the
    least disturbed measurement)."""
    if warm:
        fn()
    ts, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return min(ts), out


def loop_traces(model, facts, samples, seed):
    """Reference: one forward per (component, layer, position), noise samples as batch rows."""
    sigma = 3.0 * float(model.parameter("embed.W_E").detach().std())
    n_layers = model.n_layers
    out = []
    for p in prompts(model, facts):
        T = p.tokens.numel()
        tokens = p.tokens[None].expand(samples, T)
        noise = subject_noise(T, model.info("embed").unit_shape[0], samples, sigma, seed)
        noise = noise * p.subject[None, :, None]
        clean = {}

        def grab(x, site):
            clean[site] = x.detach().clone()

        with torch.inference_mode():
            model.logits(p.tokens[None], {f"blocks.{L}.{c}": grab for c in COMPS
                                          for L in range(n_layers)})

            def prob(restore):
                hooks = {"embed": lambda x, s: x + noise}
                for site, t in restore:
                    def put(x, s, site=site, t=t):
                        x = x.clone()
                        x[:, t] = clean[site][0, t]
                        return x
                    hooks[site] = put
                logits = model.logits(tokens, hooks)
                return torch.softmax(logits[:, -1].float(), -1)[:, p.answer].mean()

            grid = torch.zeros(len(COMPS), n_layers, T)
            for ci, c in enumerate(COMPS):
                for L in range(n_layers):
                    for t in range(T):
                        grid[ci, L, t] = prob([(f"blocks.{L2}.{c}", t) for L2 in
                                               window_layers(c, L, 1, n_layers)])
        out.append(grid)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="auto", choices=["auto", "tiny", "small"])
    ap.add_argument("--facts", type=int, default=8, help="facts for the loop comparison")
    ap.add_argument("--fast-facts", type=int, default=40, help="facts for fast vs exact")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    preset = args.preset
    if preset == "auto":
        cached = list((cache_dir() / "organism-small").glob("model-*.safetensors"))
        preset = "small" if cached else "tiny"
    org = excise.organism(preset, progress=False)
    model = org.model
    req = org.request(forget_people=range(10 if preset == "small" else 3))
    print(f"organism: {preset} ({model.n_parameters():,} parameters, {model.n_layers} layers); "
          f"torch threads {torch.get_num_threads()}")

    # -- Fisher per batch vs one forward -----------------------------------------------------
    n_b, bs = 8, 32
    facts = req.retain[:n_b * bs]
    batch = model.encode(list(facts))
    params = model.sites(kind="param")

    def forward():
        with torch.inference_mode():
            for b in batch.chunks(bs):
                model.logits(b.tokens)

    t_fwd, _ = _best(forward, args.repeats)
    t_fp, _ = _best(model.fingerprint, args.repeats)
    t_fis, _ = _best(lambda: gradient_stats(model, facts, params, batch_size=bs),
                       args.repeats)
    print(f"fisher per batch ({bs} facts, all params): {1e3 * t_fis / n_b:.1f} ms; "
          f"forward {1e3 * t_fwd / n_b:.1f} ms -> ratio {t_fis / t_fwd:.2f}x "
          f"(target <= 3.5x; {n_b} batches per call; a model fingerprint, {1e3 * t_fp:.1f} ms, "
          f"is added once per call only when a StatsCache is used)")

    # -- exact (resumed runs) vs plain loop --------------------------------------------------
    fs = req.forget[:args.facts]
    t_exact, ex = _best(lambda: traces(model, fs, samples=args.samples, seed=0),
                          args.repeats)
    t_loop, ref = _best(lambda: loop_traces(model, fs, args.samples, 0), 1, warm=False)
    diff = max(float((a.scores - b).abs().max()) for a, b in zip(ex, ref))
    print(f"exact causal tracing, {len(fs)} prompts x {len(COMPS)} components x "
          f"{model.n_layers} layers x positions, {args.samples} noise samples: exact "
          f"{t_exact:.3f} s, plain loop {t_loop:.3f} s -> {t_loop / t_exact:.1f}x faster "
          f"(target >= 5x); max |difference| {diff:.2e}")

    # -- attribution patching vs exact ------------------------------------------------------
    fs = req.forget[:args.fast_facts]
    t_ex2, ex = _best(lambda: traces(model, fs, samples=args.samples, seed=0), args.repeats)
    t_fast, fa = _best(lambda: traces(model, fs, samples=args.samples, seed=0, mode="fast"),
                         args.repeats)
    cells_e = torch.cat([t.scores.flatten() for t in ex])
    cells_f = torch.cat([t.scores.flatten() for t in fa])
    eff_e = torch.cat([t.effect().flatten() for t in ex])
    eff_f = torch.cat([t.effect().flatten() for t in fa])
    print(f"attribution patching vs exact tracing, {len(fs)} prompts: fast {t_fast:.3f} s, "
          f"exact {t_ex2:.3f} s -> {t_ex2 / t_fast:.1f}x faster (target >= 20x)")
    rho_mlp = spearman(torch.cat([t.component("mlp.out").flatten() for t in ex]),
                       torch.cat([t.component("mlp.out").flatten() for t in fa]))
    print(f"Spearman(attribution, exact) over {cells_e.numel()} cells: "
          f"{spearman(cells_f, cells_e):.3f} (mlp.out cells only {rho_mlp:.3f}); "
          f"Pearson of effects {float(torch.corrcoef(torch.stack([eff_e, eff_f]))[0, 1]):.3f}")
    fact_lookup_speed(model, req, args)


def fact_lookup_speed(model, req, args):
    """fact_lookup attribution vs exact patching on the same facts and neurons."""
    from excise.request import FactSet, ForgetRequest
    from locate import fact_lookup

    n = args.fast_facts
    sub = ForgetRequest(req.forget[:n], FactSet("retain", req.retain.facts[::max(
        1, len(req.retain) // n)][:n]))
    site = "blocks.0.mlp.post"
    t_at, at = _best(lambda: fact_lookup(model, sub, site), args.repeats)
    t_ex, ex = _best(lambda: fact_lookup(model, sub, site, mode="exact"), 1, warm=False)
    units = model.info(site).unit_shape[0]
    print(f"fact_lookup attribution vs exact patching, {len(sub.forget)} forget + "
          f"{len(sub.retain)} retain facts x {units} neurons ({site}): attribution "
          f"{t_at:.3f} s, exact {t_ex:.3f} s -> {t_ex / t_at:.0f}x faster; Spearman of scores "
          f"{spearman(at.scores[site], ex.scores[site]):.3f}, of forget effects "
          f"{spearman(at.parts['forget'][site], ex.parts['forget'][site]):.3f}")


if __name__ == "__main__":
    main()
