"""Files: written atomically (temp file + rename), weights only as safetensors, metadata as JSON.

Nothing here unpickles anything."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path | str, text: str) -> None:
    _atomic(Path(path), lambda f: f.write(text.encode()))


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    _atomic(Path(path), lambda f: f.write(data))


def write_json(path: Path | str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_default) + "\n")


def _default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot write {type(o).__name__} to JSON")


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path | str,
                     metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save

    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(path, data)


class NotSafetensorsError(ValueError):
    """A file excise reads as safetensors is not one: truncated, corrupt, another format, or a
    folder. The message names the file and what was expected."""


def _readable(path: Path | str) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if path.is_dir():
        raise NotSafetensorsError(f"{path} is a folder; expected a safetensors file")
    return path


def _not_safetensors(path: Path, err: Exception) -> NotSafetensorsError:
    size = path.stat().st_size if path.exists() else 0
    return NotSafetensorsError(
        f"{path} is not a readable safetensors file ({size:,} bytes; safetensors says: "
        f"{err}); expected a safetensors file as excise writes it - is it truncated (an "
        f"interrupted copy), corrupt, or another format (a pickle / .bin / .gguf file)?")


def load_safetensors(path: Path | str) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (nothing unpickled). A missing file raises
    ``FileNotFoundError``; a folder, a truncated, corrupt or non-safetensors file raises
    :class:`NotSafetensorsError` naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = _readable(path)
    try:
        return load_file(str(path))
    except (SafetensorError, ValueError, OSError) as e:  # (OSError: unreadable)
        raise _not_safetensors(path, e) from None


def safetensors_metadata(path: Path | str) -> dict[str, str]:
    """The string metadata of a safetensors file's header (errors as :func:`load_safetensors`)."""
    from safetensors import SafetensorError, safe_open

    path = _readable(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, ValueError, OSError) as e:
        raise _not_safetensors(path, e) from None
