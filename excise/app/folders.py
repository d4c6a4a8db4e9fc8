"""Output folders (``excise run``, ``excise verify``): written whole or not at all, and only what
excise wrote is ever removed.

- A folder is assembled in a hidden partial folder beside its target,
  ``.NAME.partial-<pid>-<random>``, and put in place only when every step has finished (one
  rename when the target is new or empty). SIGINT and SIGTERM remove the partial folder; a
  partial folder left by a process that died without cleaning up (SIGKILL, power loss) is
  removed by the next excise that writes beside it - only folders excise made (named so, holding
  its marker, from this host) whose process is gone.
- Its last file is the manifest ``run.json``: format, kind (``run`` / ``verify``), an id, and
  every file excise wrote with its size and SHA-256. A folder counts as an excise output only
  with that manifest.
- ``overwrite`` replaces an output only: it removes the files the manifest lists (refusing when
  one was changed since), the verify reports of that run excise wrote inside it, and the folders
  excise made, if then empty - never anything else. Files of its own that a user put beside them
  stay. A run is replaced only by a run, a verify report only by a verify report. A folder with
  other content and no manifest is refused, with or without ``overwrite``; so is a run written
  by an earlier excise (no manifest): delete it by hand.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator

from excise.config import ConfigError
from excise.io import partial_dir, write_json

MANIFEST = "run.json"
FORMAT = "excise.run/1"
KINDS = ("run", "verify")
_NOUN = {"run": "run", "verify": "verify report"}
# what every run or verify folder of excise 0.1.0 held (it wrote no manifest)
LEGACY_MARKERS = ("metrics.json", "report.md")
PARTIAL_MARKER = ".excise-partial.json"
_PARTIAL = re.compile(r"^\..+\.partial-(\d+)-[a-z0-9_]{8}$")
_LEGACY_PARTIAL = re.compile(r"^\..+\.partial-[a-z0-9_]{8}$")


class OutFolderError(ConfigError):
    """``--out`` is a folder excise may not write or replace; the message says why and what to
    do instead."""


class Terminated(BaseException):
    """SIGTERM arrived while excise was writing a folder (raised like ``KeyboardInterrupt`` for
    SIGINT, so the same cleanup runs)."""


# -- the manifest ------------------------------------------------------------------------------
def read_manifest(folder: Path) -> dict | None:
    """The manifest of an excise output folder; ``None`` when it has no ``run.json``. A
    ``run.json`` that is not an excise manifest raises :class:`OutFolderError`."""
    path = Path(folder) / MANIFEST
    if not path.exists() and not path.is_symlink():
        return None
    try:
        if path.is_symlink() or not path.is_file():
            raise ValueError("not a plain file")
        m = json.loads(path.read_text(encoding="utf-8"))
        _check_manifest(m)
    except (ValueError, OSError) as e:
        raise OutFolderError(f"{folder} is not an excise output: its {MANIFEST} is not an excise "
                             f"manifest ({e}); excise does not write into or replace it, even "
                             f"with --overwrite. Choose another folder") from None
    return m


def _check_manifest(m) -> None:
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        got = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise ValueError(f"format {got!r}, expected {FORMAT!r}")
    if m.get("kind") not in KINDS or not isinstance(m.get("id"), str):
        raise ValueError(f"kind {m.get('kind')!r} / id {m.get('id')!r}")
    replacing = m.get("replacing", [])
    if not isinstance(replacing, list):
        raise ValueError("'replacing' is not a list")
    for files in [m.get("files"), *replacing]:
        if not isinstance(files, dict) or not all(
                isinstance(e, dict) and isinstance(e.get("bytes"), int)
                and isinstance(e.get("sha256"), str) for e in files.values()):
            raise ValueError("'files' is not a map of file -> size and sha256")
    if not isinstance(m.get("dirs", []), list):
        raise ValueError("'dirs' is not a list")


def _entry(path: Path) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def _listing(folder: Path) -> tuple[dict[str, dict], list[str]]:
    """Every file (relative posix path -> size and SHA-256) and sub-folder excise wrote into a
    partial folder, the manifest and the partial marker left out."""
    files, dirs = {}, []
    for root, dnames, fnames in os.walk(folder):
        rel_root = Path(root).relative_to(folder)
        dirs += [(rel_root / d).as_posix() for d in dnames]
        for f in fnames:
            rel = (rel_root / f).as_posix()
            if rel not in (MANIFEST, PARTIAL_MARKER):
                files[rel] = _entry(Path(root) / f)
    return dict(sorted(files.items())), sorted(dirs)


def _inside(folder: Path, rel: str) -> Path:
    """``folder / rel`` for a path from a manifest: relative, no ``..``, no symlinked folder on
    the way (a tampered manifest must not reach outside the folder)."""
    p = PurePosixPath(rel)
    if (not rel or p.is_absolute() or "\\" in rel
            or any(part in ("", ".", "..") for part in p.parts)):
        raise OutFolderError(f"{folder}/{MANIFEST} lists {rel!r}, not a path inside the folder; "
                             f"excise does not remove anything from it. Delete it by hand")
    cur = folder
    for part in p.parts[:-1]:
        cur = cur / part
        if cur.is_symlink():
            raise OutFolderError(f"{folder}: {cur} is a symbolic link; excise does not remove "
                                 f"anything through it. Delete the folder by hand")
    return folder.joinpath(*p.parts)


# -- what --overwrite removes ------------------------------------------------------------------
@dataclass
class Removal:
    """The files and folders removing an excise output takes (all checked unchanged)."""

    folder: Path
    manifest: dict
    files: list[Path] = field(default_factory=list)
    dirs: list[Path] = field(default_factory=list)  # deepest first
    nested: list["Removal"] = field(default_factory=list)  # its verify reports inside it

    def owns(self, path: Path) -> bool:
        return path in self.files or path == self.folder / MANIFEST or any(
            n.owns(path) or path == n.folder for n in self.nested) or path in self.dirs

    def count(self) -> int:
        return len(self.files) + sum(n.count() for n in self.nested)


def plan_removal(folder: Path, m: dict) -> Removal:
    """What removing the output in ``folder`` (manifest ``m``) takes; refused when a listed file
    was changed since excise wrote it (or replaced by a folder or a link)."""
    plan = Removal(folder, m)
    expected: dict[str, list[dict]] = {}
    for files in [m["files"], *m.get("replacing", [])]:  # (an interrupted replacement's)
        for rel, e in files.items():
            expected.setdefault(rel, []).append(e)
    changed = []
    for rel, entries in sorted(expected.items()):
        p = _inside(folder, rel)
        if not p.exists() and not p.is_symlink():
            continue
        if (p.is_symlink() or not p.is_file()
                or p.stat().st_size not in {e["bytes"] for e in entries}
                or _entry(p)["sha256"] not in {e["sha256"] for e in entries}):
            changed.append(rel)
        else:
            plan.files.append(p)
    if changed:
        raise OutFolderError(
            f"{folder}: {', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''} changed "
            f"since excise wrote {'it' if len(changed) == 1 else 'them'}; --overwrite removes "
            f"only files excise wrote, unchanged. Move {'it' if len(changed) == 1 else 'them'} "
            f"out of the folder (or delete by hand), then run again")
    dirs = {_inside(folder, d) for d in m.get("dirs", []) if isinstance(d, str)}
    plan.dirs = sorted(dirs, key=lambda d: len(d.parts), reverse=True)
    for root, dnames, fnames in os.walk(folder):  # verify reports of this run inside it
        if Path(root) == folder or MANIFEST not in fnames:
            continue
        try:
            sub = read_manifest(Path(root))
        except OutFolderError:
            continue
        if sub and sub["kind"] == "verify" and (sub.get("of") or {}).get("id") == m["id"]:
            plan.nested.append(plan_removal(Path(root), sub))
            dnames.clear()
    return plan


def _remove(plan: Removal, *, keep_manifest: bool = False) -> None:
    for n in plan.nested:
        _remove(n)
    for p in plan.files:
        p.unlink(missing_ok=True)
    if not keep_manifest:  # the manifest goes last: until then the folder is still an output
        (plan.folder / MANIFEST).unlink(missing_ok=True)
    for d in plan.dirs:
        _rmdir_if_empty(d)
    if not keep_manifest and plan.manifest.get("made_folder"):
        _rmdir_if_empty(plan.folder)


def _rmdir_if_empty(d: Path) -> None:
    try:
        d.rmdir()
    except OSError:  # not empty (someone's files), or gone
        pass


# -- checking --out ----------------------------------------------------------------------------
def check_out(out: Path, overwrite: bool, *, kind: str = "run") -> Removal | None:
    """Refuse an ``--out`` excise may not write: a file, a path under a file, a mount point, a
    non-empty folder that is not an excise output (or one written by an earlier excise), an
    output without ``overwrite``, or one with a file changed since excise wrote it. Returns what
    ``overwrite`` would remove (``None`` for a new or empty folder)."""
    out = Path(out)
    what = _NOUN[kind]
    anc = out
    while not anc.exists() and not anc.is_symlink() and anc != anc.parent:
        anc = anc.parent
    if anc != out and not anc.is_dir():
        raise OutFolderError(f"--out {out}: {anc} is a file, not a folder; give a path in a "
                             f"folder for the {what}")
    if not out.exists():
        if out.is_symlink():
            raise OutFolderError(f"--out {out} is a broken symbolic link; give a new folder")
        return None
    if not out.is_dir():
        raise OutFolderError(f"--out {out} exists and is not a folder (a file is in the way); "
                             f"give a new folder for the {what}")
    if os.path.ismount(out):
        raise OutFolderError(f"--out {out} is a mount point; excise puts a finished {what} in "
                             f"place by renaming it, which a mount point does not allow. Give a "
                             f"folder inside it, e.g. --out {out / kind}")
    if not any(out.iterdir()):
        return None
    m = read_manifest(out)
    if m is None:
        if all((out / n).is_file() for n in LEGACY_MARKERS):
            raise OutFolderError(
                f"--out {out} looks like a run written by an earlier excise (it has "
                f"{' and '.join(LEGACY_MARKERS)} but no {MANIFEST} manifest): excise cannot tell "
                f"which files it wrote, so it does not overwrite it, even with --overwrite. If "
                f"it is an old run you no longer need, delete it by hand; or choose another "
                f"--out")
        raise OutFolderError(
            f"--out {out} is a non-empty folder that is not an excise run (it has no "
            f"{MANIFEST}); refusing to write into it, even with --overwrite, which replaces "
            f"only a folder excise wrote. Choose another --out")
    if not overwrite:
        raise OutFolderError(f"--out {out} already holds a {_NOUN[m['kind']]}; choose another "
                             f"folder or pass --overwrite (it removes only the files excise "
                             f"wrote there, as {out / MANIFEST} lists them)")
    if m["kind"] != kind:
        raise OutFolderError(f"--out {out} holds a {_NOUN[m['kind']]}; --overwrite replaces a "
                             f"{_NOUN[m['kind']]} only with another one, not with a {what}. "
                             f"Choose another --out")
    return plan_removal(out, m)


# -- stale partial folders ---------------------------------------------------------------------
def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # (PermissionError: alive, someone else's)
        return True
    return True


def clear_stale(parent: Path, log: Callable[[str], None] = print) -> list[Path]:
    """Remove the partial folders in ``parent`` that excise made on this host for a process that
    is gone (killed before it could clean up). Returns them. Partial folders of an earlier excise
    (no pid recorded) are named in the log, never removed."""
    removed, legacy = [], []
    host = socket.gethostname()
    try:
        entries = sorted(Path(parent).iterdir())
    except OSError:
        return removed
    for d in entries:
        m = _PARTIAL.match(d.name)
        if m is None:
            if _LEGACY_PARTIAL.match(d.name) and d.is_dir() and not d.is_symlink():
                legacy.append(d.name)
            continue
        if d.is_symlink() or not d.is_dir():
            continue
        pid = int(m.group(1))
        try:
            info = json.loads((d / PARTIAL_MARKER).read_text())
        except (OSError, ValueError):
            continue  # not made by excise (or not recognisably): left alone
        if not isinstance(info, dict) or info.get("pid") != pid or info.get("host") != host \
                or _alive(pid):
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
        log(f"removed {d}: the partial folder of excise process {pid}, which stopped before "
            f"finishing")
    if legacy:
        log(f"note: {parent} holds partial folders of an earlier excise ({', '.join(legacy)}); "
            f"delete them by hand if no excise is writing there")
    return removed


# -- writing a folder --------------------------------------------------------------------------
def _make_partial(out: Path) -> Path:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = partial_dir(out, f".{out.name}.partial-{os.getpid()}-")
    except OSError as e:
        raise OutFolderError(f"--out {out}: cannot create a folder in {out.parent} "
                             f"({e.strerror or e}); give a writable folder") from None
    try:
        write_json(tmp / PARTIAL_MARKER, {"pid": os.getpid(), "host": socket.gethostname(),
                                          "started": _now()})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _on_sigterm(signum, frame):
    raise Terminated("terminated by SIGTERM")


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def staged(out: Path, *, overwrite: bool = False, kind: str = "run",
           info: dict | None = None, log: Callable[[str], None] = print) -> Iterator[Path]:
    """A partial folder to write an output (``kind``: ``run`` or ``verify``) into; on a normal
    exit it is put in place as ``out`` with its manifest (``info`` added to it), on any exception
    (SIGINT, SIGTERM included) it is removed and ``out`` is left as it was."""
    out = Path(out)
    if out.is_symlink() and out.is_dir():
        out = Path(os.path.realpath(out))
    check_out(out, overwrite, kind=kind)
    clear_stale(out.parent, log)
    handle = _main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if handle else None
    restored = not handle
    tmp = None
    try:
        tmp = _make_partial(out)
        try:
            yield tmp
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, (KeyboardInterrupt, Terminated)):
                log(f"stopped: removed the unfinished {_NOUN[kind]} ({tmp.name}); {out} is "
                    f"unchanged")
            raise
        held = _hold_signals()
        try:
            try:
                _finalize(tmp, out, overwrite, kind, info or {}, log)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            finally:  # a signal held over the finalize meets the previous handler
                if not restored:
                    signal.signal(signal.SIGTERM, previous if previous is not None
                                  else signal.SIG_DFL)
                    restored = True
        finally:
            _release_signals(held)
    finally:
        if not restored:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _hold_signals():
    if not _main_thread() or not hasattr(signal, "pthread_sigmask"):
        return None
    return signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})


def _release_signals(held) -> None:
    if held is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _finalize(tmp: Path, out: Path, overwrite: bool, kind: str, info: dict,
              log: Callable[[str], None]) -> None:
    (tmp / PARTIAL_MARKER).unlink(missing_ok=True)
    files, dirs = _listing(tmp)
    fresh = not out.exists()
    manifest = {"format": FORMAT, "kind": kind, "id": uuid.uuid4().hex,
                "excise": _version(), "created": _now(), "complete": True,
                "made_folder": fresh, **info, "files": files, "dirs": dirs}
    if fresh or (out.is_dir() and not any(out.iterdir())):
        write_json(tmp / MANIFEST, manifest)  # the last file of the output
        try:
            os.rename(tmp, out)  # (onto an empty folder: replaces it)
            return
        except OSError as e:
            if not out.exists() or (out.is_dir() and not any(out.iterdir())):
                raise OutFolderError(f"--out {out}: cannot put the finished {_NOUN[kind]} in "
                                     f"place ({e.strerror or e}); the new {_NOUN[kind]} was "
                                     f"discarded. Give a writable folder") from None
            # something appeared at --out meanwhile: as below
    what = _NOUN[kind]
    try:
        plan = check_out(out, overwrite, kind=kind)
    except OutFolderError as e:
        raise OutFolderError(f"{e} (it changed while the {what} was going; the new {what} was "
                             f"discarded)") from None
    if plan is None:
        raise OutFolderError(f"--out {out} appeared while the {what} was going; left it alone, "
                             f"the new {what} was discarded")
    manifest["made_folder"] = plan.manifest.get("made_folder", False)
    clash = [rel for rel in [*files, *dirs] if (out / rel).exists() and not plan.owns(out / rel)
             and not ((out / rel).is_dir() and rel in dirs)]
    if clash:
        raise OutFolderError(f"--out {out} holds {', '.join(clash[:5])}, which excise did not "
                             f"write, where the new {what} has files; left it alone, the new "
                             f"{what} was discarded. Move them, then run again")
    write_json(tmp / MANIFEST, manifest)
    _replace(tmp, out, manifest, plan)
    log(f"--overwrite: replaced the {plan.count()} files excise had written in {out}")


def _replace(tmp: Path, out: Path, manifest: dict, plan: Removal) -> None:
    """Put the output in ``tmp`` in place of the one in ``out``. Until the new manifest is in
    place, ``out``'s manifest lists the old files and the incoming ones (``complete: false``,
    ``replacing``), so
    an interrupted replacement is still a run ``--overwrite`` can replace, and never looks
    finished."""
    interim = dict(plan.manifest, complete=False,
                   replacing=[manifest["files"], *plan.manifest.get("replacing", [])],
                   dirs=sorted(set(plan.manifest.get("dirs", [])) | set(manifest["dirs"])))
    write_json(out / MANIFEST, interim)
    _remove(plan, keep_manifest=True)
    for rel in manifest["dirs"]:
        (out / rel).mkdir(parents=True, exist_ok=True)
    for rel in manifest["files"]:
        os.replace(tmp / rel, out / rel)
    os.replace(tmp / MANIFEST, out / MANIFEST)
    shutil.rmtree(tmp, ignore_errors=True)  # (only its emptied folders are left)


def _version() -> str:
    from excise import __version__

    return __version__


def incomplete(folder: Path) -> bool:
    """Whether ``folder`` is an output whose replacement was interrupted (SIGKILL, power loss):
    it mixes old and new files."""
    try:
        m = read_manifest(Path(folder))
    except OutFolderError:
        return False
    return m is not None and not m.get("complete", False)


def manifest_id(folder: Path) -> str | None:
    """The id of the output in ``folder`` (``None``: no manifest, e.g. a run of an earlier
    excise)."""
    try:
        m = read_manifest(Path(folder))
    except OutFolderError:
        return None
    return m["id"] if m else None
