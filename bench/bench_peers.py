"""excise beside the reference implementations, on the same random Hugging Face GPT-2 and
inputs, each ratio measured in one run (repetitions interleaved, medians, 1 torch thread).

    python bench/bench_peers.py [--part trace|fisher|all] [--cases 4:10,4:1,12:10]
                                [--samples 10] [--repeats 3] [--batch-sizes 1,8,32]
                                [--harness DIR] [--reference auto|peers|inrepo]

- causal tracing: ``locate`` exact traces vs ROME's ``calculate_hidden_flow`` (3 components:
  hidden / MLP / attention, 5 prompts, noise samples as batch rows, window ``W``), per case
  ``LAYERS:W``; the same tokens (no BOS, as ROME encodes), subject range, answer (the clean
  argmax), noise scale (3 x std of the subjects' token embeddings) and noise
  (``numpy.RandomState(1)`` draws, as ROME). Also excise's resumed runs vs excise's full
  forwards (its own earlier algorithm).
- Fisher: ``locate.fisher`` (forget + retain, ``reduction="token"``) vs SSD's
  ``calc_importance`` on the same forget and retain facts in the same batches (the loss over
  every target token of a batch), and the max |difference| of the forget-side values; and one
  set alone: excise's gradient pass (``gradient_stats``) vs one ``calc_importance``. The first
  includes what ``fisher`` adds per call (the weights' fingerprint for the Importance, the
  finiteness checks, the Importance's validation).

The reference code is not part of excise and nothing is fetched. ``--harness`` (default
``$EXCISE_PEERS``, else ``../shared/peers`` beside the repository) is a folder with the
harnesses ``rome_trace.py`` / ``ssd_ref.py``, which import unmodified ROME and SSD checkouts
(``$PEERS_DIR``, see the harness README). Where they are missing (``--reference auto``) or with
``--reference inrepo``, the script runs in-repo reimplementations of the same algorithms instead
and every line says so: ROME's one forward per (position, layer) cell with the clean prompt as
row 0 of the batch and its state copied into the noised rows, a fresh ``RandomState(1)`` per
forward; SSD's per-batch cross-entropy over every target token, backward, squared gradients
summed and divided by the number of batches.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import locate  # noqa: E402
from excise.hf import HFHandle  # noqa: E402
from excise.request import ForgetRequest  # noqa: E402
from locate._grads import gradient_stats  # noqa: E402
from locate.causal_trace import _exact_traces, _groups, _Prompt  # noqa: E402

# (prompt, subject): the subject is a substring of the prompt, as ROME's token search needs
FACTS = [
    ("The Eiffel Tower is located in the city of", "Eiffel Tower"),
    ("Miles Davis plays the instrument called the", "Miles Davis"),
    ("The mother tongue of Danielle Darrieux is", "Danielle Darrieux"),
    ("Steve Jobs was the founder of the company", "Steve Jobs"),
    ("The Space Needle is a tower found in the city of", "Space Needle"),
]
CORPUS = [p for p, _ in FACTS] + [
    "Paris is a city in France, and the tower there is made of iron.",
    "The trumpet is an instrument that Davis played in many jazz bands.",
    "French is the language spoken by the actress from Bordeaux.",
    "Apple is a company founded in California by two friends.",
    "Seattle is a city in the state of Washington on the Pacific coast.",
    "Words like piano, violin, guitar and drums name instruments.",
]
KINDS = ((None, "resid_post"), ("mlp", "mlp.out"), ("attn", "attn.out"))  # ROME kind, excise


class Clock:
    """Wall-clock and process CPU seconds of repeated runs (on a shared machine the CPU time of
    this single-threaded process is the steadier measure of the work done)."""

    def __init__(self):
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def __call__(self, fn):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        self.wall.append(time.perf_counter() - w)
        self.cpu.append(time.process_time() - c)
        return out

    def median(self, cpu: bool = False) -> float:
        return statistics.median(self.cpu if cpu else self.wall)


def ratio(ref: Clock, ours: Clock, digits: int = 2) -> str:
    """``ref / ours`` on wall-clock and CPU medians, and the median of per-repetition ratios."""
    per = statistics.median(r / e for r, e in zip(ref.wall, ours.wall))
    return (f"{ref.median() / ours.median():.{digits}f}x wall (per-repetition median "
            f"{per:.{digits}f}x), {ref.median(True) / ours.median(True):.{digits}f}x CPU time")


# ------------------------------------------------------------------------------------------------
# the shared model
# ------------------------------------------------------------------------------------------------
def build(n_layer: int, seed: int = 0):
    """A byte-level BPE tokenizer trained in memory on ``CORPUS`` and a random GPT-2 (d 256,
    8 heads) in eval mode."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>",
                                  eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    cfg = GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=256, n_layer=n_layer,
                     n_head=8, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = GPT2LMHeadModel(cfg).eval()
    return model, tok


# ------------------------------------------------------------------------------------------------
# reference code: the harnesses (real ROME / SSD) or in-repo reimplementations
# ------------------------------------------------------------------------------------------------
def load_harness(path: str | None, mode: str):
    """(rome_trace, ssd_ref) harness modules with working checkouts, or (None, None)."""
    if mode == "inrepo":
        return None, None
    folder = Path(path or os.environ.get("EXCISE_PEERS") or ROOT.parent / "shared" / "peers")
    try:
        sys.path.insert(0, str(folder))
        rome = importlib.import_module("rome_trace")
        ssd = importlib.import_module("ssd_ref")
        with contextlib.redirect_stdout(io.StringIO()):
            rome.load_rome()
            ssd.load_ssd()
        return rome, ssd
    except (ImportError, SystemExit, OSError) as e:
        if mode == "peers":
            raise SystemExit(f"reference harness not usable at {folder}: {e}")
        print(f"(reference code not found at {folder}: {e}; using in-repo reimplementations)")
        return None, None


def rome_inputs(model, tok, prompt: str, subject: str):
    """What ROME's calculate_hidden_flow works on: the prompt's tokens (no BOS), the subject's
    token range and the clean run's argmax answer."""
    enc = tok(prompt, add_special_tokens=False, return_offsets_mapping=True)
    ids = torch.tensor(enc["input_ids"])
    a = prompt.index(subject)
    inside = [i for i, (s, e) in enumerate(enc["offset_mapping"]) if s < a + len(subject) and e > a]
    with torch.no_grad():
        answer = int(model(input_ids=ids[None]).logits[0, -1].argmax())
    return ids, (inside[0], inside[-1] + 1), answer


def subject_std(model, tok, subjects) -> float:
    """ROME's noise scale unit: std of the token embeddings of the subjects' tokens."""
    ids = torch.tensor([i for s in subjects for i in tok(s, add_special_tokens=False)
                        ["input_ids"]])
    with torch.no_grad():
        return float(model.get_input_embeddings()(ids).std())


def rome_noise(samples: int, rng: tuple[int, int], d: int, sigma: float) -> torch.Tensor:
    """``[samples, n_subject_tokens, d]``: the draws of a fresh ``RandomState(1)``, scaled."""
    b, e = rng
    return torch.from_numpy(numpy.random.RandomState(1).randn(samples, e - b, d)) * sigma


def inrepo_rome(model, ids, rng, answer, kind, window, samples, sigma):
    """ROME's algorithm, reimplemented: for every (position, layer) cell one forward of
    ``samples + 1`` rows (row 0 clean, the others noised on the subject), the clean row's
    state copied into the noised rows at that position for the window's layers; P(answer) at
    the last position, averaged over the noised rows. Returns ``[positions, layers]``."""
    n = model.config.n_layer
    T = ids.numel()
    b, e = rng
    inp = ids[None].expand(samples + 1, T)
    noise = rome_noise(samples, rng, model.config.n_embd, sigma).float()
    blocks = model.transformer.h

    def run(t, layers):
        handles = []

        def corrupt(mod, args, out):
            out = out.clone()
            out[1:, b:e] += noise
            return out

        def restore(mod, args, out):
            h = out[0] if isinstance(out, tuple) else out
            h[1:, t] = h[0, t]
            return out

        handles.append(model.transformer.wte.register_forward_hook(corrupt))
        for L in layers:
            m = blocks[L] if kind is None else getattr(blocks[L], kind)
            handles.append(m.register_forward_hook(restore))
        try:
            logits = model(input_ids=inp).logits
        finally:
            for h in handles:
                h.remove()
        return torch.softmax(logits[1:, -1], -1).mean(0)[answer]

    out = torch.zeros(T, n)
    with torch.no_grad():
        for t in range(T):
            for L in range(n):
                layers = [L] if kind is None else range(max(0, L - window // 2),
                                                        min(n, L - (-window // 2)))
                out[t, L] = run(t, layers)
    return out


# ------------------------------------------------------------------------------------------------
# causal tracing
# ------------------------------------------------------------------------------------------------
def trace_case(n_layer: int, window: int, samples: int, repeats: int, rome) -> None:
    model, tok = build(n_layer)
    handle = HFHandle(model, tok, name=f"gpt2-{n_layer}l")
    sigma = 3.0 * subject_std(model, tok, [s for _, s in FACTS])
    ps, noises, inputs = [], {}, []
    for prompt, subject in FACTS:
        ids, rng, answer = rome_inputs(model, tok, prompt, subject)
        subj = torch.zeros(ids.numel(), dtype=torch.bool)
        subj[rng[0]:rng[1]] = True
        p = _Prompt(ids, subj, answer, tuple(tok.decode([i]) for i in ids.tolist()),
                    _groups(subj))
        nz = torch.zeros(samples, ids.numel(), model.config.n_embd)
        nz[:, rng[0]:rng[1]] = rome_noise(samples, rng, model.config.n_embd, sigma).float()
        noises[id(p)] = nz
        ps.append(p)
        inputs.append((ids, rng, answer))
    comps = tuple(c for _, c in KINDS)
    n = model.config.n_layer

    def run_excise(resume=True):
        return _exact_traces(handle, ps, comps, n, window, samples, 1024,
                             lambda p: noises[id(p)], resume=resume)

    def run_reference():
        if rome is not None:
            with contextlib.redirect_stdout(io.StringIO()):
                r = rome.run_rome(model, tok, FACTS, samples=samples, noise=sigma,
                                  kinds=tuple(k for k, _ in KINDS), window=window)
            return [[res[k or "hidden"]["scores"] for k, _ in KINDS] for res in r["results"]]
        return [[inrepo_rome(model, ids, rng, ans, k, window, samples, sigma) for k, _ in KINDS]
                for ids, rng, ans in inputs]

    what = "ROME calculate_hidden_flow" if rome is not None else \
        "in-repo reimplementation of ROME's per-cell restoration"
    run_excise()  # warm-up
    c_ref, c_ex, c_full = Clock(), Clock(), Clock()
    for _ in range(repeats):  # interleaved
        ref = c_ref(run_reference)
        ex = c_ex(run_excise)
        full = c_full(lambda: run_excise(resume=False))
    diff = max(float((tr.component(c).T - r).abs().max())
               for tr, rs in zip(ex, ref) for (_, c), r in zip(KINDS, rs))
    diff_full = max(float((a.scores - b.scores).abs().max()) for a, b in zip(ex, full))
    print(f"[{n_layer} layers, window {window}, {len(FACTS)} prompts x {len(KINDS)} components "
          f"x {samples} samples] {what} {c_ref.median():.2f} s, excise {c_ex.median():.2f} s "
          f"(medians of {repeats})")
    print(f"  excise causal_trace vs {'ROME calculate_hidden_flow' if rome else 'ROME (in-repo)'}"
          f": {ratio(c_ref, c_ex)}; max |difference| {diff:.1e}")
    print(f"  excise resumed runs vs excise full forwards (own earlier algorithm): "
          f"{ratio(c_full, c_ex)}; max |difference| {diff_full:.1e}")


# ------------------------------------------------------------------------------------------------
# Fisher
# ------------------------------------------------------------------------------------------------
def fisher_request(tok, n: int = 16) -> ForgetRequest:
    """``n`` forget and ``n`` retain facts with 1-4 token targets."""
    words = [w for w in " ".join(CORPUS).replace(",", " ").replace(".", " ").split() if w]
    g = torch.Generator().manual_seed(0)

    def fact(i):
        k = 1 + i % 4
        pick = [words[int(j)] for j in torch.randint(len(words), (3 + k,), generator=g)]
        return (f"The {pick[0]} of {pick[1]} {pick[2]} is", " ".join(pick[3:]))

    return ForgetRequest.from_lists(forget=[fact(i) for i in range(n)],
                                    retain=[fact(n + i) for i in range(n)])


def ssd_batches(handle: HFHandle, facts, batch_size: int):
    """SSD's batches ``(x, None, y)`` over the same chunks excise uses: x = ids and attention
    mask, y = the next token where it is a target token, -100 elsewhere."""
    out = []
    for b in handle.encode(list(facts)).chunks(batch_size):
        T = b.tokens.shape[1]
        mask = (torch.arange(T)[None] < b.lengths[:, None]).long()
        y = torch.where(b.target_mask[:, 1:], b.tokens[:, 1:], torch.tensor(-100))
        out.append((torch.stack([b.tokens, mask], 1), None, y.reshape(-1)))
    return out


def inrepo_ssd(model, batches) -> dict[str, torch.Tensor]:
    """SSD's calc_importance, reimplemented: per batch, cross-entropy over every target token,
    backward, squared gradients summed; divided by the number of batches."""
    params = dict(model.named_parameters())
    imp = {k: torch.zeros_like(p) for k, p in params.items()}
    for x, _, y in batches:
        model.zero_grad()
        logits = model(input_ids=x[:, 0], attention_mask=x[:, 1]).logits[:, :-1]
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y).backward()
        for k, p in params.items():
            if p.grad is not None:
                imp[k] += p.grad.pow(2)
    return {k: v / len(batches) for k, v in imp.items()}


def fisher_part(batch_sizes, repeats: int, ssd) -> None:
    model, tok = build(4)
    handle = HFHandle(model, tok, name="gpt2-4l")
    req = fisher_request(tok)
    what = "SSD calc_importance" if ssd is not None else "SSD (in-repo)"

    def reference(bs, sets=None):
        out = []
        for facts in sets or (req.forget, req.keep):
            batches = ssd_batches(handle, facts, bs)
            if ssd is not None:
                pp = ssd.make_perturber(model)
                out.append(ssd.strip(pp.calc_importance(batches)))
            else:
                out.append(inrepo_ssd(model, batches))
        model.zero_grad(set_to_none=True)
        return out

    sites = handle.sites(kind="param")

    for bs in batch_sizes:
        locate.fisher(handle, req, reduction="token", batch_size=bs)  # warm-up
        c_ref, c_ex, c_one, c_pass = Clock(), Clock(), Clock(), Clock()
        for _ in range(repeats):  # interleaved
            ref = c_ref(lambda: reference(bs))
            imp = c_ex(lambda: locate.fisher(handle, req, reduction="token", batch_size=bs))
            c_one(lambda: reference(bs, [req.forget]))
            c_pass(lambda: gradient_stats(handle, req.forget, sites, reduction="token",
                                          batch_size=bs, stats=("sq",)))
        fact = locate.fisher(handle, req, reduction="fact", batch_size=bs)
        diff = scale = diff_fact = 0.0
        for site, f in imp.parts["forget"].items():
            r = ref[0][handle.info(site).target]
            diff = max(diff, float((f - r).abs().max()))
            diff_fact = max(diff_fact, float((fact.parts["forget"][site] - r).abs().max()))
            scale = max(scale, float(r.abs().max()))
        print(f"[Fisher, {len(req.forget)} forget + {len(req.keep)} retain facts, batch {bs}] "
              f"{what} (forget + retain) {c_ref.median() * 1e3:.0f} ms, excise "
              f"{c_ex.median() * 1e3:.0f} ms (medians of {repeats})")
        print(f"  excise fisher vs {what}: {ratio(c_ref, c_ex)}; max |difference| {diff:.1e} "
              f"(largest value {scale:.1e}); with reduction='fact' {diff_fact:.1e}")
        print(f"  one set: excise's gradient pass (gradient_stats) {c_pass.median() * 1e3:.0f} ms"
              f" vs {what} {c_one.median() * 1e3:.0f} ms: {ratio(c_one, c_pass)}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", default="all", choices=["trace", "fisher", "all"])
    ap.add_argument("--cases", default="4:10,4:1,12:10", help="LAYERS:WINDOW,...")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--harness", default=None)
    ap.add_argument("--reference", default="auto", choices=["auto", "peers", "inrepo"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    rome, ssd = load_harness(args.harness, args.reference)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    if args.part in ("trace", "all"):
        for case in args.cases.split(","):
            layers, window = (int(x) for x in case.split(":"))
            trace_case(layers, window, args.samples, args.repeats, rome)
    if args.part in ("fisher", "all"):
        fisher_part([int(b) for b in args.batch_sizes.split(",")], args.repeats, ssd)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
