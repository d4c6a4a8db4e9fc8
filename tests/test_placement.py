"""Where a model runs: device / dtype words, the organism and Hugging Face loaders, configs and
the CLI, and models sharded with an accelerate ``device_map``.

No machine here has a GPU, let alone two: a sharded model is dispatched through accelerate's
device hooks with every shard on the CPU (the hooks that move activations between GPUs run all
the same), and every method must give exactly what the unsharded model gives."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

import edit
import locate
import probes
from excise import config as C
from excise.app import pipeline
from excise.app.cli import app
from excise.hf import load_model
from excise.placement import best_device, check_device_map, resolve_device, resolve_dtype

sys.path.insert(0, str(Path(__file__).parent))
from test_hf import tiny as tiny_hf, tiny_request as hf_request, word_tokenizer  # noqa: E402

GPT2_SHARDS = {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.h.0": "cpu",
               "transformer.h.1": "cpu", "transformer.ln_f": "cpu", "lm_head": "cpu"}


@pytest.fixture()
def no_gpu(monkeypatch):
    """This machine as one without CUDA, whatever it has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


# ------------------------------------------------------------------------- words -> torch


def test_dtype_words():
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype("torch.float16") is torch.float16
    assert resolve_dtype("auto") is None and resolve_dtype(None) is None
    with pytest.raises(ValueError, match=r"dtype='int8': choose one of 'auto', bf16, bfloat16"):
        resolve_dtype("int8")
    with pytest.raises(ValueError, match="weights need a floating dtype"):
        resolve_dtype(torch.int64)


def test_device_words(no_gpu):
    assert best_device() == torch.device("cpu") and resolve_device("auto").type == "cpu"
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(None) is None
    with pytest.raises(ValueError, match="no CUDA GPU"):
        resolve_device("cuda:1")
    with pytest.raises(ValueError, match=r"'gpu' is not a device; choose one of auto, cpu, cuda"):
        resolve_device("gpu")
    with pytest.raises(ValueError, match="give a GPU index"):
        check_device_map({"transformer.h.0": 1.5})
    with pytest.raises(ValueError, match="choose one of auto, balanced"):
        check_device_map("everywhere")


def test_config_and_cli_refuse_a_device_this_machine_lacks(tmp_path, no_gpu):
    cfg = C.build({"model": {"device": "cuda", "dtype": "bf16"}})
    with pytest.raises(C.ConfigError, match="model: device='cuda': this machine has no CUDA"):
        pipeline.Setup.check(cfg)
    with pytest.raises(C.ConfigError, match="sharding is for Hugging Face models"):
        pipeline.Setup.check(C.build({"model": {"device_map": "auto"}}))
    from typer.testing import CliRunner

    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["run", "--set", "organism.preset=tiny", "--device", "cuda",
                                 "--out", str(out), "--quiet"])
    assert r.exit_code == 2 and "no CUDA GPU" in r.output and not out.exists()
    r = CliRunner().invoke(app, ["run", "--set", "organism.preset=tiny", "--dtype", "fp8",
                                 "--out", str(out), "--quiet"])
    assert r.exit_code == 2 and "dtype='fp8': choose one of" in r.output


# ------------------------------------------------------------------------- the organism


def test_organism_placed_as_asked_oracles_too(tiny, tiny_request):
    import excise

    org = excise.organism("tiny", dtype="bfloat16", device="auto", progress=False)
    assert org.model.dtype is torch.bfloat16 and org.model.device == best_device()
    assert org.model.model.cfg.dtype is torch.bfloat16  # TransformerLens' config kept in step
    # the same cached float32 training, cast: every weight is the float32 one rounded
    ref = tiny.model.named_parameters()
    for name, p in org.model.named_parameters().items():
        assert torch.equal(p, ref[name].to(torch.bfloat16)), name
    assert org.oracle(tiny_request).dtype is torch.bfloat16
    # casting back and forth in place is the handle's own business too
    h = tiny.model.clone().to(dtype="bf16")
    assert h.dtype is torch.bfloat16 and h.to(dtype=torch.float32).dtype is torch.float32


# ------------------------------------------------------------------------- sharded models


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    tiny_hf("gpt2").model.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def _same(a: dict, b: dict) -> bool:
    """Equal metrics, NaN equal to NaN (this request has no holdout or shared facts)."""
    return a.keys() == b.keys() and all(a[k] == b[k] or (a[k] != a[k] and b[k] != b[k])
                                        for k in a)


def _load(folder, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_model(path=str(folder), **kw)


def test_sharded_model_runs_through_device_hooks_and_matches(gpt2_folder):
    plain, sharded = _load(gpt2_folder), _load(gpt2_folder, device_map=GPT2_SHARDS)
    assert plain.device_map is None and sharded.device_map == GPT2_SHARDS
    hooked = {n for n, m in sharded.model.named_modules() if hasattr(m, "_hf_hook")}
    assert {"transformer.h.0", "transformer.h.1", "lm_head"} <= hooked  # accelerate's hooks
    req = hf_request()
    for name in ("fisher", "grad_ratio", "activations", "causal_trace", "attribution",
                 "circuit"):
        a, b = locate.METHODS[name](plain, req), locate.METHODS[name](sharded, req)
        for site in a.scores:
            assert torch.equal(a.scores[site], b.scores[site]), (name, site)
    before = probes.verify(plain, req, label="m").metrics["m"]
    assert _same(probes.verify(sharded, req, label="m").metrics["m"], before)
    imp = locate.fisher(sharded, req)
    weights = {k: v.clone() for k, v in sharded.named_parameters().items()}
    with edit.dampen(sharded, imp, alpha=2.0) as e:
        with edit.dampen(plain, imp, alpha=2.0):
            assert e.manifest["params_changed"] > 0
            assert _same(probes.verify(sharded, req, label="m").metrics["m"],
                         probes.verify(plain, req, label="m").metrics["m"])
    for k, v in sharded.named_parameters().items():
        assert torch.equal(v, weights[k]), k
    with pytest.raises(ValueError, match="is sharded .* cannot be moved to cpu as a whole"):
        sharded.to("cpu")  # accelerate's hooks decide where each module runs
    assert sharded.to(dtype=None) is sharded


def test_offloaded_modules_are_refused(gpt2_folder, tmp_path):
    """A map that sends a module to disk leaves its weights on 'meta' between forwards: excise
    could neither score nor edit them, so the load says so instead of failing later."""
    shards = dict(GPT2_SHARDS, **{"transformer.h.1": "disk"})
    with pytest.raises(ValueError, match=r"offloads 'transformer.h.1' to the CPU or disk"):
        _load(gpt2_folder, device_map=shards)
    with pytest.raises(ValueError, match="both place the model"):
        _load(gpt2_folder, device_map=GPT2_SHARDS, device="cpu")


def test_sweep_config_places_its_organism(no_gpu):
    from excise.app import sweep

    tiny = Path(__file__).parent.parent / "configs" / "sweep-tiny.yaml"
    cfg = sweep.load_config(tiny, ["model.dtype=bf16"])
    assert cfg.model.dtype == "bf16" and sweep._run_config(cfg).model.dtype == "bf16"
    with pytest.raises(C.ConfigError, match=r"unknown key 'name' \(valid: device, dtype\)"):
        sweep.load_config(tiny, ["model.name=gpt2"])
    with pytest.raises(C.ConfigError, match="no CUDA GPU"):
        pipeline.Setup.check(sweep._run_config(sweep.load_config(tiny, ["model.device=cuda"])))
