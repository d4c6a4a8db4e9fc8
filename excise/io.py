"""Files: written atomically (temp file + rename), weights only as safetensors, metadata as JSON.

Nothing here unpickles anything."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import tempfile
import threading
from pathlib import Path

import torch


def _umask() -> int:
    """The process's file-creation mask, read where the OS shows it (Linux), else set and put
    back at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def partial_dir(target: Path, prefix: str) -> Path:
    """A new hidden folder beside ``target`` (``prefix`` + a random tail) for staging what is
    renamed into place when complete, with the permissions ``mkdir`` gives (``mkdtemp`` makes
    it private, 0700: a run folder renamed from it would be unreadable to the user's group)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    with contextlib.suppress(OSError):  # best effort: a file system without modes keeps its own
        os.chmod(tmp, (0o777 & ~_umask()) | (tmp.stat().st_mode & stat.S_ISGID))
    return tmp


def _atomic(path: Path, write) -> None:
    """Write ``path`` through a temp file renamed over it. The file gets the permissions of the
    file it replaces, or those ``open`` gives a new file (0666 less the umask) - not
    ``mkstemp``'s private 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):
                try:
                    mode = path.stat().st_mode & 0o777
                except OSError:
                    mode = 0o666 & ~_umask()
                with contextlib.suppress(OSError):  # best effort, as in partial_dir
                    os.fchmod(f.fileno(), mode)
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


def write_marked_section(path: Path | str, block: str, start: str, end: str) -> None:
    """Replace the text between the markers ``start`` .. ``end`` (included) in the Markdown
    file ``path`` with ``block`` (which carries the markers itself), or append ``block`` when
    the file has no such section; atomically. How bench scripts own a section of
    docs/results.md that the sweep keeps when it rewrites the rest."""
    path = Path(path)
    text = path.read_text() if path.exists() else ""
    if start in text and end in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    atomic_write_text(path, text)


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


@contextlib.contextmanager
def signals_held(signums=(signal.SIGINT, signal.SIGTERM)):
    """Hold SIGINT / SIGTERM for the duration of a call into compiled code, then deliver them.

    A Python signal handler raises (``KeyboardInterrupt``, excise's ``Terminated``) at whatever
    Python call is running; inside safetensors' Rust reader that call is a callback into torch
    whose failure the reader can turn into another error (a ``ValueError`` about an
    ``UntypedStorage``), which a cache read takes for a corrupt file - the stop request is lost
    and the model is retrained. Here the handlers only record; on exit the previous handlers are
    restored and each recorded signal is raised again, so it is handled where Python code runs.
    Outside the main thread (where handlers cannot be set) nothing is held."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    seen: list[int] = []
    try:
        with contextlib.ExitStack() as restore:  # every handler put back, whatever interrupts
            for s in signums:
                previous = signal.getsignal(s)
                if previous is None:  # (set outside Python: could not be put back; not held)
                    continue
                restore.callback(signal.signal, s, previous)  # (registered before the swap)
                signal.signal(s, lambda signum, _frame: seen.append(signum))
            yield
    finally:
        # each held signal once, in arrival order; when the first one's handler raises (the
        # process is stopping), a second one held is not delivered
        for s in dict.fromkeys(seen):
            signal.raise_signal(s)


def load_safetensors(path: Path | str) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (nothing unpickled). A missing file raises
    ``FileNotFoundError``; a folder, a truncated, corrupt or non-safetensors file raises
    :class:`NotSafetensorsError` naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = _readable(path)
    try:
        with signals_held():
            return load_file(str(path))
    except (SafetensorError, ValueError, OSError) as e:  # (OSError: unreadable)
        raise _not_safetensors(path, e) from None


def safetensors_metadata(path: Path | str) -> dict[str, str]:
    """The string metadata of a safetensors file's header (errors as :func:`load_safetensors`)."""
    from safetensors import SafetensorError, safe_open

    path = _readable(path)
    try:
        with signals_held(), safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, ValueError, OSError) as e:
        raise _not_safetensors(path, e) from None


# -- cache integrity: checksums, locks, a named warning (helper F, issue 19) --------------------
class CacheWarning(UserWarning):
    """A cached file failed its check (corrupt, truncated, unreadable) and is being rebuilt."""


def file_sha256(path: Path | str) -> str:
    """The sha256 hex digest of a file's bytes."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checksum_problem(path: Path | str, want: str | None) -> str | None:
    """Why ``path`` does not hold the bytes whose sha256 is ``want`` ("missing", "no checksum
    recorded", "checksum mismatch ..."), or ``None`` when it does."""
    path = Path(path)
    if not path.is_file():
        return "missing"
    if not want:
        return "no checksum recorded"
    have = file_sha256(path)
    if have != want:
        return (f"checksum mismatch (sha256 {have[:16]}..., recorded {want[:16]}...; "
                f"{path.stat().st_size:,} bytes): corrupt or truncated")
    return None


def read_cache_entry(weights: Path | str, meta: Path | str
                     ) -> tuple[dict[str, torch.Tensor] | None, str | None]:
    """A cache entry written as ``weights`` (safetensors) beside ``meta`` (JSON with the
    weights' ``sha256``): ``(state, None)`` when it passes its checks, ``(None, why)`` when it
    fails one (missing meta, bad JSON, checksum, not safetensors), ``(None, None)`` when there is
    no entry at all."""
    weights, meta = Path(weights), Path(meta)
    if not (weights.exists() or meta.exists()):
        return None, None
    why = None
    try:
        recorded = json.loads(meta.read_text()) if meta.exists() else None
        if not isinstance(recorded, dict):
            why = f"{meta} is missing" if recorded is None else f"{meta} is not a JSON object"
        else:
            problem = checksum_problem(weights, recorded.get("sha256"))
            if problem:
                why = f"{weights}: {problem}"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        why = f"{meta} is unreadable ({e})"
    if why is not None:
        return None, why
    try:
        return load_safetensors(weights), None
    except (NotSafetensorsError, OSError) as e:
        return None, str(e)


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order: equal digests
    mean identical tensors, however the file holding them was laid out."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        # the bytes hashed where they lie (no copy of the tensor)
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


class file_lock:
    """An exclusive ``fcntl`` lock on ``path`` (created, never deleted) held inside the
    ``with`` block: a second process blocks until the first releases it. ``on_wait(path)`` is
    called once when the lock is held by someone else, before blocking."""

    def __init__(self, path: Path | str, on_wait=None):
        self.path = Path(path)
        self.on_wait = on_wait
        self._fd: int | None = None

    def __enter__(self) -> "file_lock":
        try:
            import fcntl
        except ImportError:  # (no fcntl: Windows) - unlocked, as before locks existed
            return self
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:  # a read-only cache: nothing can be written there, reading needs no lock
            return self
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if self.on_wait is not None:
                    self.on_wait(self.path)
                fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            import fcntl

            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None
