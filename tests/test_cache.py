"""Caches (issue 19): organism / oracle training is bit-reproducible whatever the caller's thread
count, two processes on an empty cache train once and agree, and every cached tensor file
(organism, oracle, SAE, Gemma) is checked against the checksum recorded when it was written - a
flipped byte or a cut copy is named in a CacheWarning and rebuilt, never used.

The organism tests use ``MICRO``, a preset that trains in well under a second (the tiny organism
takes a minute), each in its own empty cache folder.
"""

from __future__ import annotations

import importlib
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

import excise
from excise.edits import Diff, ParamChange
from excise.io import CacheWarning, file_sha256
from excise.train import reproducible

orgmod = importlib.import_module("excise.organism")  # (excise.organism is also the function)
ROOT = Path(__file__).resolve().parent.parent
MICRO = orgmod.Preset("micro", n_people=4, n_holdout=2, n_layers=1, d_model=16, n_heads=2,
                      d_mlp=32, steps=20, batch_size=16, n_filler=10)


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    """An empty EXCISE_CACHE for this test alone."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("EXCISE_CACHE", str(folder))
    return folder


@pytest.fixture()
def threads():
    """Restores the test process's torch thread count after a test that changes it."""
    n = torch.get_num_threads()
    yield n
    torch.set_num_threads(n)


def flip_byte(path: Path, offset: int | None = None) -> None:
    """Flip the low bit of one byte of ``path`` (default: the middle byte)."""
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def tensor_span(data: bytes, name: str) -> tuple[int, int]:
    """Where tensor ``name``'s bytes lie in a safetensors file's ``data``."""
    n = struct.unpack("<Q", data[:8])[0]
    start, end = json.loads(data[8:8 + n])[name]["data_offsets"]
    return 8 + n + start, 8 + n + end


def tampered_diff_bytes() -> bytes:
    """An excise diff file with one byte of a new value flipped after it was saved (needs no
    model: ``Diff.load`` refuses it before any model is built)."""
    d = Diff({"blocks.0.mlp.W_in": ParamChange(torch.tensor([0, 5]), torch.zeros(2),
                                                torch.full((2,), 0.5))},
             {"method": "dampen", "params": {"alpha": 10.0}, "fingerprint_before": "0" * 16,
              "fingerprint_after": "1" * 16})
    with tempfile.TemporaryDirectory() as tmp:
        path = d.save(Path(tmp) / "edit.safetensors")
        data = bytearray(path.read_bytes())
    lo, _ = tensor_span(bytes(data), "blocks.0.mlp.W_in::new")
    data[lo + 2] ^= 0x01
    return bytes(data)


# ------------------------------------------------------------------------ reproducible training
def test_reproducible_fixes_the_threaded_embedding_backward_and_restores_settings(threads):
    """With two threads an indexed read's backward (every embedding) adds with unordered atomic
    float adds; under reproducible() (strict deterministic algorithms, new tensors not
    NaN-filled) it is bit-identical run after run, and the caller's thread count and
    deterministic settings come back afterwards, also after an exception."""
    import torch.utils.deterministic as det

    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 300, (64, 20), generator=g)
    grad_out = torch.randn(64, 20, 64, generator=g)
    w = torch.randn(300, 64, requires_grad=True)
    torch.set_num_threads(2)
    with reproducible(2):
        assert torch.get_num_threads() == 2 and torch.are_deterministic_algorithms_enabled()
        # strict (an op without a deterministic kernel raises), no NaN-filling of new tensors
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
        assert det.fill_uninitialized_memory is False
        grads = []
        for _ in range(30):
            w.grad = None
            w[idx, :].backward(grad_out)
            grads.append(w.grad.clone())
    assert all(torch.equal(grads[0], gr) for gr in grads)
    assert torch.get_num_threads() == 2 and not torch.are_deterministic_algorithms_enabled()
    assert det.fill_uninitialized_memory is True
    torch.set_num_threads(1)
    with pytest.raises(RuntimeError, match="boom"):
        with reproducible(2):
            raise RuntimeError("boom")
    assert torch.get_num_threads() == 1 and not torch.are_deterministic_algorithms_enabled()
    with pytest.raises(ValueError, match="threads=0"):
        with reproducible(0):
            pass


def test_training_ignores_the_callers_thread_count(threads):
    """Same weights whether the caller runs 2 threads or 1 (training runs at TRAIN_THREADS),
    and the caller's setting is left as it was."""
    world = orgmod.make_world(MICRO.n_people, MICRO.n_holdout, seed=0, n_filler=MICRO.n_filler)
    tok = orgmod.Tokenizer(world.vocabulary())
    prints = []
    for n in (2, 1, 2):
        torch.set_num_threads(n)
        prints.append(orgmod.train_model(MICRO, world, tok, progress=False).fingerprint())
        assert torch.get_num_threads() == n and not torch.are_deterministic_algorithms_enabled()
    assert len(set(prints)) == 1, prints


def test_training_through_the_fused_forward_follows_the_serial_one():
    """The plain recipe's steps (``engine=None``: the fused forward and fused AdamW) train the
    same function as the recipe through TransformerLens and AdamW's loop (``engine="serial"``,
    same batches, same steps) to float precision: the trained models' outputs agree within float
    noise, not bit for bit (compared by outputs: Adam turns rounding noise in a gradient that is
    zero in exact arithmetic into steps of size lr); the planted and canary recipes refuse
    the fused steps, an unknown engine is named."""
    world = orgmod.make_world(MICRO.n_people, MICRO.n_holdout, seed=0, n_filler=MICRO.n_filler)
    tok = orgmod.Tokenizer(world.vocabulary())
    serial = orgmod.train_model(MICRO, world, tok, progress=False, engine="serial")
    fused = orgmod.train_model(MICRO, world, tok, progress=False)
    assert fused.fingerprint() == orgmod.train_model(MICRO, world, tok, progress=False,
                                                     engine="fused").fingerprint()
    start = orgmod.build_model(MICRO, len(tok), n_ctx=32)
    tokens = serial.encode_texts(orgmod.training_texts(MICRO, world, frozenset())[:32]).tokens
    with torch.no_grad():
        a, b, c = serial.logits(tokens), fused.logits(tokens), start(tokens)
    assert serial.fingerprint() != fused.fingerprint()
    assert float((a - b).abs().max()) < 1e-3 < float((a - c).abs().max())
    with pytest.raises(ValueError, match="serial"):
        orgmod.train_model(MICRO, world, tok, progress=False, engine="vmap")
    with pytest.raises(ValueError, match="plain recipe"):
        orgmod.train_model(MICRO, world, tok, progress=False, engine="fused",
                           canaries=orgmod.Canaries())


def test_cache_key_records_torch_version_and_thread_count(cache, monkeypatch):
    world = orgmod.make_world(MICRO.n_people, MICRO.n_holdout, seed=0, n_filler=MICRO.n_filler)
    weights, meta = orgmod.cache_files(MICRO, world)
    monkeypatch.setattr(orgmod, "TRAIN_THREADS", orgmod.TRAIN_THREADS + 1)
    assert orgmod.cache_files(MICRO, world)[0] != weights
    monkeypatch.undo()
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    assert orgmod.cache_files(MICRO, world)[0] != weights
    monkeypatch.undo()
    monkeypatch.setenv("EXCISE_CACHE", str(cache))
    org = excise.organism(MICRO, progress=False)
    recorded = json.loads(meta.read_text())
    assert recorded["torch"] == torch.__version__
    assert recorded["threads"] == orgmod.TRAIN_THREADS
    assert recorded["sha256"] == file_sha256(weights)
    assert recorded["fingerprint"] == org.model.fingerprint()


_RACER = """
import os, sys, time
sys.path.insert(0, {root!r})
import transformer_lens  # noqa: F401  (imported before the start, so only training races)
import excise
orgmod = sys.modules["excise.organism"]
real = orgmod.train_model
def slow_train(*a, **k):
    print("TRAINED", flush=True)
    time.sleep(2.0)  # hold the lock long enough for the other process to arrive
    return real(*a, **k)
orgmod.train_model = slow_train
open(sys.argv[1], "w").close()  # ready
while not os.path.exists(sys.argv[2]):
    time.sleep(0.01)
org = excise.organism(orgmod.Preset("micro", n_people=4, n_holdout=2, n_layers=1,
                                    d_model=16, n_heads=2, d_mlp=32, steps=20, batch_size=16,
                                    n_filler=10), progress=True)
print("FINGERPRINT", org.model.fingerprint(), flush=True)
"""


def test_two_processes_on_an_empty_cache_train_once_and_agree(cache, tmp_path):
    """Two processes ask for the same organism at once: one trains and writes, the other waits
    for the lock and loads the same weights; both match a training in this process."""
    script = tmp_path / "racer.py"
    script.write_text(_RACER.format(root=str(ROOT)))
    env = dict(os.environ, EXCISE_CACHE=str(cache), OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / f"ready{i}"), str(go)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    deadline = time.time() + 240
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)):
        assert time.time() < deadline and all(p.poll() is None for p in procs), \
            [p.communicate() for p in procs if p.poll() is not None]
        time.sleep(0.05)
    go.touch()
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    trained = [o.count("TRAINED") for o, _ in outs]
    prints = [o.split("FINGERPRINT")[1].split()[0] for o, _ in outs]
    assert sorted(trained) == [0, 1], outs
    waiter = outs[trained.index(0)][1]
    assert "waiting for another process to finish model-" in waiter, waiter
    assert prints[0] == prints[1]
    with tempfile.TemporaryDirectory() as other:  # a fresh training here: the same bits
        os.environ["EXCISE_CACHE"], before = other, os.environ["EXCISE_CACHE"]
        try:
            assert excise.organism(MICRO, progress=False).model.fingerprint() == prints[0]
        finally:
            os.environ["EXCISE_CACHE"] = before


# ------------------------------------------------------------------ the organism cache's checks
@pytest.mark.parametrize("damage", ["flip", "truncate", "json", "no-json", "not-safetensors"])
def test_a_damaged_organism_cache_is_named_and_retrained(cache, damage):
    org = excise.organism(MICRO, progress=False)
    good = org.model.fingerprint()
    weights, meta = orgmod.cache_files(MICRO, org.world)
    want = {"flip": (weights, "checksum mismatch"), "truncate": (weights, "checksum mismatch"),
            "json": (meta, "is unreadable"), "no-json": (meta, "is missing"),
            "not-safetensors": (weights, "checksum mismatch")}[damage]
    if damage == "flip":
        flip_byte(weights)
    elif damage == "truncate":
        truncate(weights)
    elif damage == "json":
        meta.write_text("{ not json")
    elif damage == "no-json":
        meta.unlink()
    else:
        weights.write_bytes(b"\x80\x04 a pickle")
    with pytest.warns(CacheWarning) as got:
        again = excise.organism(MICRO, progress=False)
    msg = str(got[0].message)
    assert "fails its check and is retrained" in msg and str(want[0]) in msg and want[1] in msg
    assert again.model.fingerprint() == good  # rebuilt: the same bits, never the damaged ones
    assert json.loads(meta.read_text())["sha256"] == file_sha256(weights)
    with _no_warnings():  # and the rebuilt entry passes its check
        assert excise.organism(MICRO, progress=False).model.fingerprint() == good


def test_a_damaged_oracle_is_named_and_retrained(cache):
    org = excise.organism(MICRO, progress=False)
    req = org.request([0])
    good = org.oracle(req).fingerprint()
    weights, _ = orgmod.cache_files(MICRO, org.world, frozenset({0}))
    assert weights.name.startswith("oracle-") and weights.exists()
    data = weights.read_bytes()
    lo, hi = tensor_span(data, "blocks.0.mlp.W_in")
    flip_byte(weights, (lo + hi) // 2)
    with pytest.warns(CacheWarning, match="oracle-.*checksum mismatch"):
        assert org.oracle(req).fingerprint() == good


class _no_warnings:
    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("error", CacheWarning)

    def __exit__(self, *exc):
        self._w.__exit__(*exc)


# ----------------------------------------------------------------------------- the SAE cache
def test_a_damaged_sae_cache_is_refused_by_load_and_retrained(cache, planted):
    from excise.request import FactSet
    from excise.sae import SAETrainConfig, load_sae, train_sae

    facts = FactSet("sae", tuple(planted.request.forget) + tuple(planted.request.retain))
    cfg = SAETrainConfig(expansion=2, steps=20, batch_tokens=16)
    site = "blocks.1.resid_post"
    sae, scale, path = train_sae(planted.handle, facts, site, cfg)
    good = {k: v.detach().clone() for k, v in sae.state_dict().items()}
    recorded = json.loads((path / "excise.json").read_text())["sha256"]
    assert set(recorded) == {"sae_weights.safetensors", "cfg.json"}
    assert not [p for p in path.parent.iterdir() if ".partial-" in p.name]
    for name, damage in [("sae_weights.safetensors", flip_byte),
                         ("sae_weights.safetensors", truncate), ("cfg.json", truncate)]:
        damage(path / name)
        with pytest.raises(ValueError, match=f"{path / name}: checksum mismatch"):
            load_sae(path)
        with pytest.warns(CacheWarning, match=f"SAE fails its check and is retrained: "
                                              f"{path / name}: checksum mismatch"):
            sae2, scale2, path2 = train_sae(planted.handle, facts, site, cfg)
        assert path2 == path and scale2 == scale
        assert all(torch.equal(v, good[k]) for k, v in sae2.state_dict().items())
        load_sae(path)  # the rebuilt entry passes
    (path / "excise.json").write_text("{}")
    with pytest.raises(ValueError, match="is unreadable"):
        load_sae(path)


# ---------------------------------------------------------------------------- the Gemma cache
def _fake_gemma_build(builds: list):
    """A stand-in for Gemma's GGUF conversion: a 2-layer GPT-2 with a word tokenizer, written
    and checksummed as _build_cache writes the real one."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    gemma = importlib.import_module("excise.gemma")

    def build(folder: Path, log) -> None:
        builds.append(folder)
        out = folder.parent / f".{folder.name}.partial-test"
        cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=20,
                                      n_positions=8)
        torch.manual_seed(0)
        transformers.GPT2LMHeadModel(cfg).save_pretrained(out)
        words = ["<pad>", "<bos>", "<unk>"] + [f"w{i}" for i in range(17)]
        tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
        tk.pre_tokenizer = pre_tokenizers.Whitespace()
        transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>",
                                             pad_token="<pad>",
                                             unk_token="<unk>").save_pretrained(out)
        gemma._write_manifest(out, "fake", "0" * 64)
        if folder.exists():
            import shutil

            shutil.rmtree(folder)
        out.rename(folder)

    return build


def test_a_damaged_gemma_cache_is_named_and_rebuilt(tmp_path, monkeypatch):
    gemma = importlib.import_module("excise.gemma")
    builds: list = []
    monkeypatch.setattr(gemma, "_build_cache", _fake_gemma_build(builds))
    monkeypatch.setattr(gemma, "available", lambda: (True, ""))
    folder = tmp_path / "gemma"
    monkeypatch.setenv("EXCISE_GEMMA_CACHE", str(folder))
    quiet = lambda m: None  # noqa: E731
    model, _ = gemma.load_hf(log=quiet)
    good = {k: v.clone() for k, v in model.state_dict().items()}
    sums = json.loads((folder / "excise.json").read_text())["sha256"]
    assert "model.safetensors" in sums and "config.json" in sums and len(builds) == 1
    with _no_warnings():
        gemma.load_hf(log=quiet)
    assert len(builds) == 1  # a good cache is used as it is
    for name, damage, why in [("model.safetensors", flip_byte, "checksum mismatch"),
                              ("model.safetensors", truncate, "checksum mismatch"),
                              ("config.json", truncate, "checksum mismatch"),
                              ("excise.json", lambda p: p.write_text("{"), "is unreadable")]:
        damage(folder / name)
        with pytest.warns(CacheWarning, match=f"Gemma cache fails its check and is rebuilt: "
                                              f"{folder / name}.*{why}"):
            model, _ = gemma.load_hf(log=quiet)
        assert all(torch.equal(v, good[k]) for k, v in model.state_dict().items())
    n = len(builds)
    meta = json.loads((folder / "excise.json").read_text())
    (folder / "excise.json").write_text(json.dumps(meta | {"format": "excise.gemma-cache/1"}))
    with pytest.warns(CacheWarning, match="an older excise's cache"):
        gemma.load_hf(log=quiet)
    assert len(builds) == n + 1
    # no package and a damaged cache: named, then the install hint - never the damaged weights
    monkeypatch.setattr(gemma, "available", lambda: (False, "the package is not installed"))
    flip_byte(folder / "model.safetensors")
    with pytest.warns(CacheWarning, match="model.safetensors: checksum mismatch"):
        with pytest.raises(ModuleNotFoundError, match="not installed"):
            gemma.load_hf(log=quiet)


class _Stop(BaseException):
    """What a raising signal handler throws (excise's ``Terminated``, ``KeyboardInterrupt``)."""


def _raise_stop(signum, frame):
    raise _Stop(signum)


def test_a_signal_during_a_weights_read_is_delivered_not_taken_for_a_corrupt_file(
        tmp_path, monkeypatch):
    """A stop request that lands inside safetensors' reader (a Rust call back into torch that
    turns the handler's exception into a ValueError, as CI saw: "could not determine the shape of
    object type 'torch.storage.UntypedStorage'") must stop the process, not read as a corrupt
    cache file to be retrained. Simulated: a reader that signals itself mid-read and swallows
    what its Python callback raises, the way the compiled reader did."""
    import signal

    import safetensors.torch

    from excise.io import load_safetensors, save_safetensors

    path = tmp_path / "w.safetensors"
    save_safetensors({"w": torch.arange(4.0)}, path)
    real = safetensors.torch.load_file
    reached = []

    def swallowing_reader(filename, *a, **k):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # (Python bytecode runs: an unheld handler fires here)
                pass
            out = real(filename, *a, **k)
        except BaseException:
            raise ValueError("could not determine the shape of object type "
                             "'torch.storage.UntypedStorage'") from None
        reached.append(True)
        return out

    monkeypatch.setattr(safetensors.torch, "load_file", swallowing_reader)
    previous = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        with pytest.raises(_Stop):
            load_safetensors(path)
        assert reached  # the read itself finished; the stop came after it
        assert signal.getsignal(signal.SIGTERM) is _raise_stop  # the handler is back
        monkeypatch.setattr(safetensors.torch, "load_file", real)
        assert torch.equal(load_safetensors(path)["w"], torch.arange(4.0))  # nothing held now
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_signals_held_puts_every_handler_back_and_delivers_each_signal_once():
    """Nothing held leaks: after an error in the body the handlers are the caller's again; a
    signal held while the body ran reaches the caller's handler once, after the body."""
    import signal

    from excise.io import signals_held

    calls = []

    def mine(signum, _frame):
        calls.append(signum)

    before = {s: signal.signal(s, mine) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(ZeroDivisionError):
            with signals_held():
                1 / 0
        assert all(signal.getsignal(s) is mine for s in before)
        with signals_held():
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)  # (pending twice: still one signal)
            for _ in range(1000):
                pass
            assert calls == []  # held while the body runs
        assert calls == [signal.SIGTERM]
        assert all(signal.getsignal(s) is mine for s in before)
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def test_files_and_staged_folders_get_the_permissions_open_and_mkdir_give(tmp_path):
    """Atomic writes go through a private temp file and staged folders through a private temp
    folder; what lands carries the umask's permissions (0644 / 0755 at umask 022, 0640 / 0750
    at 027), a replaced file keeps its own mode, and a run folder renamed into place is as
    readable as a folder the user made."""
    from excise.app.folders import staged
    from excise.io import atomic_write_text, partial_dir

    old = os.umask(0o022)
    try:
        for mask, file_mode, dir_mode in ((0o022, 0o644, 0o755), (0o027, 0o640, 0o750)):
            os.umask(mask)
            f = tmp_path / f"new-{mask:o}.json"
            atomic_write_text(f, "{}")
            assert f.stat().st_mode & 0o777 == file_mode
            d = partial_dir(tmp_path / f"x-{mask:o}", ".x-")
            assert d.stat().st_mode & 0o777 == dir_mode and d.parent == tmp_path
            out = tmp_path / f"run-{mask:o}"
            with staged(out, overwrite=False, kind="run", log=lambda _: None) as tmp:
                atomic_write_text(tmp / "metrics.json", "{}")
            assert out.stat().st_mode & 0o777 == dir_mode
            assert (out / "metrics.json").stat().st_mode & 0o777 == file_mode
        kept = tmp_path / "kept.json"
        kept.write_text("{}")
        kept.chmod(0o600)
        atomic_write_text(kept, "[]")
        assert kept.stat().st_mode & 0o777 == 0o600 and kept.read_text() == "[]"
    finally:
        os.umask(old)
