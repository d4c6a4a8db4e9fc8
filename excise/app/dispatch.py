"""Independent cells of work, run in this process, on a local process pool, or as Ray tasks.

A :class:`Cell` is one call of a module-level function (a worker imports it by name) with
picklable arguments. :func:`dispatch` runs a list of cells through an :class:`Executor` and
returns one :class:`Outcome` per cell, **in the cells' order**, whatever order they finish in. A
cell that raises (or whose worker dies) is tried again, at most ``retries`` times; one that still
fails comes back with its error - never dropped. A cell may need the values of earlier cells
(``needs``): it is submitted once they have succeeded, their values passed after its own
arguments; when one of them failed it is not run, and its outcome says which.

Executors (:data:`EXECUTORS`, :func:`make_executor`):

- ``serial``: every cell in this process, one after another.
- ``local``: a pool of worker processes on this machine (``spawn``: each worker imports excise
  afresh; a script that dispatches needs ``if __name__ == "__main__":``).
- ``ray``: plain Ray tasks (``pip install 'excise[ray]'``): on the Ray instance this process is
  already connected to, the cluster ``RAY_ADDRESS`` names, or else a local instance started here
  and stopped at the end. Plain tasks, not Ray Tune: the cells are a fixed list of function calls
  with known inputs - no search space, trial scheduler, early stopping or checkpoints to manage -
  and a task keeps the worker's call the same function the serial and local executors make
  (Tune would wrap it in a trainable, add its own result folders and logging, and pull in
  ``ray[tune]``'s extra dependencies). Ray's own retries are off: the retry rule is this
  module's, the same for every executor.

Threads: every cell runs at ``threads`` torch threads, whichever executor runs it (default: the
count in effect in the caller - ``--threads``, else ``OMP_NUM_THREADS``, else every core). CPU
numbers depend on the thread count, so the same threads give the same records serially or in a
pool. Workers never oversubscribe the cores: ``local`` runs ``cores // threads`` workers by
default (at least 1) and refuses ``workers x threads > cores``; a Ray task asks Ray for
``threads`` CPUs, so Ray runs at most ``CPUs // threads`` of them at once on a node (a local
instance started here gets ``workers x threads`` CPUs, default every core).

Start-up: a worker's start is mostly imports (torch, transformer_lens: about 8 s of CPU on this
project's 2-core machine). Before the first cell a local pool, or a local Ray instance started
here, starts as many workers as there are cells to run (at most ``workers``) side by side, each
importing ``preload`` as it starts, and waits until all are up - so the first cells run in
parallel instead of all in whichever worker was ready first.

Workers see this process's ``EXCISE_*`` environment (the cache folders: organisms and oracles are
trained once, in the caller, and workers load them from the on-disk cache), plus ``env``. On a
Ray cluster every node needs excise installed and the cache on a shared file system.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import threading
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor
from concurrent.futures import wait as wait_futures
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

EXECUTORS = ("serial", "local", "ray")


@dataclass(frozen=True)
class Cell:
    """One independent piece of work: ``fn(*args, *values of needs)``. ``key`` names it (unique
    in a dispatch, shown in logs and errors); ``fn`` is a module-level function, so that a worker
    process can import it; ``needs``: keys of earlier cells whose values it takes."""

    key: str
    fn: Callable[..., Any]
    args: tuple = ()
    needs: tuple[str, ...] = ()

    def __post_init__(self):
        if not isinstance(self.key, str) or not self.key:
            raise ValueError(f"Cell key={self.key!r}: give a non-empty string naming the cell")
        if not callable(self.fn):
            raise ValueError(f"cell {self.key!r}: fn={self.fn!r} is not callable")
        if "<" in getattr(self.fn, "__qualname__", ""):  # <lambda>, <locals>
            raise ValueError(f"cell {self.key!r}: fn {self.fn.__qualname__!r} is not a "
                             f"module-level function; a worker process cannot import it")
        if isinstance(self.needs, str):
            raise ValueError(f"cell {self.key!r}: needs={self.needs!r}: give a tuple of keys")


@dataclass(frozen=True)
class Attempt:
    """One try of a cell, as a worker returns it: its value, or its error and traceback."""

    value: Any = None
    error: str | None = None
    trace: str | None = None
    seconds: float = 0.0


@dataclass(frozen=True)
class Outcome:
    """What became of a cell: its ``value``, or its last ``error`` (``trace``: that error's
    traceback); ``attempts``: how often it ran (0: not run, a cell it needs failed);
    ``seconds``: its last attempt's wall time in the worker."""

    key: str
    value: Any = None
    error: str | None = None
    trace: str | None = None
    attempts: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


def attempt(fn: Callable[..., Any], args: tuple, threads: int | None) -> Attempt:
    """Run ``fn(*args)`` once at ``threads`` torch threads; an exception comes back as the
    attempt's error (what workers run, whichever executor)."""
    from excise.train import using_threads

    t = time.perf_counter()
    try:
        with using_threads(threads):
            value = fn(*args)
    except Exception as e:  # reported and retried by dispatch(), never raised in a worker
        return Attempt(error=f"{type(e).__name__}: {e}", trace=traceback.format_exc(),
                       seconds=round(time.perf_counter() - t, 3))
    return Attempt(value=value, seconds=round(time.perf_counter() - t, 3))


class Executor(Protocol):
    """Where cells run: ``submit`` starts one call of :func:`attempt` and returns a handle,
    ``wait`` the positions of the handles that have finished (at least one), ``result`` the
    finished handle's :class:`Attempt` (a worker that died or a value that could not be sent
    back is an attempt's error, never an exception). Used as a context manager: resources
    (processes, a Ray instance) live from ``__enter__`` to ``__exit__``."""

    name: str
    workers: int | None  # cells at a time (None: as many as the Ray cluster's CPUs allow)
    threads: int  # torch threads of every cell

    def __enter__(self) -> "Executor": ...

    def __exit__(self, *exc) -> None: ...

    def warm(self, n: int) -> None: ...  # start up to n workers and wait until they are up

    def submit(self, fn: Callable[..., Any], args: tuple) -> Any: ...

    def wait(self, handles: list) -> list[int]: ...

    def result(self, handle) -> Attempt: ...


def cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _threads(threads: int | None) -> int:
    import torch

    if threads is None:
        return torch.get_num_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads={threads!r}: need an integer >= 1, or None for the torch "
                         f"threads in effect ({torch.get_num_threads()})")
    return threads


def _check_workers(workers, threads: int, what: str, local: bool = True) -> None:
    """``workers`` an integer >= 1 or None; on this machine (``local``), workers x threads
    within the cores."""
    if workers is None:
        return
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers={workers!r}: need an integer >= 1, or None (default: "
                         f"cores // threads)")
    n = cores()
    if local and workers * threads > n:
        raise ValueError(f"workers={workers} x threads={threads} = {workers * threads} torch "
                         f"threads on {n} cores: {what} would oversubscribe them; give at most "
                         f"workers={max(1, n // threads)} at {threads} thread(s), or fewer "
                         f"threads (--threads)")


def worker_env(threads: int, env: dict | None = None) -> dict[str, str]:
    """What workers get in their environment: this process's ``EXCISE_*`` variables, the thread
    count for OpenMP / MKL, and ``env``."""
    out = {k: v for k, v in os.environ.items() if k.startswith("EXCISE_")}
    out |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return out | {str(k): str(v) for k, v in (env or {}).items()}


class SerialExecutor:
    """Every cell in this process, one at a time, in the order submitted."""

    name = "serial"

    def __init__(self, threads: int | None = None):
        self.threads = _threads(threads)
        self.workers = 1

    def __enter__(self) -> "SerialExecutor":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def warm(self, n: int) -> None:
        pass

    def submit(self, fn, args) -> Attempt:
        return attempt(fn, args, self.threads)  # runs now: the handle is the finished attempt

    def wait(self, handles: list) -> list[int]:
        return list(range(len(handles)))

    def result(self, handle: Attempt) -> Attempt:
        return handle


def _exit_with_parent(parent: int, every: float = 1.0) -> None:
    """Watch (a daemon thread) for the process that started this worker to end, then exit: a
    killed sweep (SIGTERM, SIGKILL: no cleanup runs) must not leave workers computing cells no
    one will read, on cores someone else now needs."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every)
        os._exit(1)

    threading.Thread(target=watch, name="excise-parent-watch", daemon=True).start()


def _init_worker(env: dict[str, str], threads: int, preload: tuple[str, ...]) -> None:
    """A pool worker's start: exit when the caller does (:func:`_exit_with_parent`), the
    caller's cache folders, the thread count, and the modules its cells will import (imported
    now, while the other workers start too)."""
    import importlib

    _exit_with_parent(os.getppid())
    os.environ.update(env)
    import torch

    torch.set_num_threads(threads)
    for module in preload:
        importlib.import_module(module)


_WARM_TIMEOUT = 600.0  # seconds the workers of a warm-up wait for each other


def _rendezvous(folder: str, n: int) -> int:
    """A warm-up task: mark this worker present in ``folder``, then wait until ``n`` workers
    are (each task holds its worker, so ``n`` of them can only meet in ``n`` workers)."""
    Path(folder, str(os.getpid())).touch()
    t = time.time()
    while len(os.listdir(folder)) < n:
        if time.time() - t > _WARM_TIMEOUT:
            raise TimeoutError(f"warm-up: {len(os.listdir(folder))} of {n} workers started "
                               f"within {_WARM_TIMEOUT:.0f} s")
        time.sleep(0.02)
    return os.getpid()


def _warm_up(executor, n: int) -> None:
    """Start ``n`` workers side by side and return once all are up, so that the first cells
    run in parallel rather than all in the first worker ready. Best effort: a worker that dies
    here only ends the warm-up (the cells are retried as usual)."""
    if n < 2:
        return
    with tempfile.TemporaryDirectory(prefix="excise-warm-") as folder:
        pending = [executor.submit(_rendezvous, (folder, n)) for _ in range(n)]
        while pending:
            for i in sorted(executor.wait(pending), reverse=True):
                executor.result(pending.pop(i))


_PRELOAD_VAR = "EXCISE_WORKER_PRELOAD"  # comma-separated modules a Ray worker imports at start


def ray_worker_setup() -> None:
    """A Ray worker's start (``worker_process_setup_hook``): import the modules its cells will
    import, named in its environment."""
    import importlib

    for module in filter(None, os.environ.get(_PRELOAD_VAR, "").split(",")):
        importlib.import_module(module)


class LocalExecutor:
    """A pool of ``workers`` spawned processes on this machine (default: ``cores // threads``,
    at least 1, so workers x threads <= cores); a pool whose worker died is replaced.
    ``preload``: modules every worker imports as it starts."""

    name = "local"

    def __init__(self, workers: int | None = None, threads: int | None = None,
                 env: dict | None = None, preload: Sequence[str] = ()):
        self.threads = _threads(threads)
        _check_workers(workers, self.threads, "a local pool")
        # the default pool: as many workers as fit the cores at this thread count
        self.workers = workers if workers is not None else max(1, cores() // self.threads)
        self.env = env
        self.preload = tuple(preload)
        self._pool: ProcessPoolExecutor | None = None
        self._pool_of: dict = {}  # future -> the pool it was submitted to

    def _start(self) -> None:
        self._pool = ProcessPoolExecutor(
            self.workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker, initargs=(worker_env(self.threads, self.env),
                                                self.threads, self.preload))

    def _stop(self, kill: bool = False) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        if kill:  # stopped by an exception (Ctrl-C): do not wait for running cells
            for p in list((getattr(pool, "_processes", None) or {}).values()):
                p.terminate()
        pool.shutdown(wait=not kill, cancel_futures=True)

    def __enter__(self) -> "LocalExecutor":
        self._start()
        return self

    def __exit__(self, exc_type, *_) -> None:
        self._stop(kill=exc_type is not None)

    def warm(self, n: int) -> None:
        # the pool starts a worker per task while none is idle: n waiting tasks start n
        # workers now, side by side, instead of one at a time as cells become ready
        _warm_up(self, min(n, self.workers))

    def submit(self, fn, args):
        if self._pool is None:  # a worker died and broke the pool: a fresh one
            self._start()
        fut = self._pool.submit(attempt, fn, args, self.threads)
        self._pool_of[fut] = self._pool
        return fut

    def wait(self, handles: list) -> list[int]:
        done, _ = wait_futures(handles, return_when=FIRST_COMPLETED)
        return [i for i, h in enumerate(handles) if h in done]

    def result(self, handle) -> Attempt:
        pool = self._pool_of.pop(handle, None)
        try:
            return handle.result()
        except BrokenProcessPool as e:  # every cell in flight fails with it; they are retried
            if pool is self._pool:  # (not a fresh pool started since for a retry)
                self._stop()
            return Attempt(error=f"a worker process died ({e})")
        except Exception as e:  # e.g. the value could not be pickled back
            return Attempt(error=f"{type(e).__name__}: {e}", trace=traceback.format_exc())


class RayExecutor:
    """Plain Ray tasks, one per cell, each asking Ray for ``threads`` CPUs. Attaches to the Ray
    instance this process is connected to, or to ``RAY_ADDRESS``; else starts a local instance
    (``workers x threads`` CPUs, default every core) and stops it at the end. ``preload``:
    modules every worker of a local instance started here imports as it starts."""

    name = "ray"

    def __init__(self, workers: int | None = None, threads: int | None = None,
                 env: dict | None = None, preload: Sequence[str] = ()):
        require_ray()
        self.threads = _threads(threads)
        # a cluster's size is its own; a local instance's must fit this machine
        _check_workers(workers, self.threads, "a local Ray instance",
                       local=not os.environ.get("RAY_ADDRESS"))
        self.workers = workers
        self.env = env
        self.preload = tuple(preload)
        self._started = False
        self._task = None
        self._refs: set = set()

    def __enter__(self) -> "RayExecutor":
        import ray

        env = worker_env(self.threads, self.env)
        options: dict = {"num_cpus": self.threads, "max_retries": 0}
        if not ray.is_initialized():
            kw = {}
            if self.workers is not None and not os.environ.get("RAY_ADDRESS"):
                kw["num_cpus"] = self.workers * self.threads
            runtime_env: dict = {"env_vars": env}
            if self.preload:  # the workers Ray starts import them while the first cells run
                env[_PRELOAD_VAR] = ",".join(self.preload)
                runtime_env["worker_process_setup_hook"] = f"{__name__}.ray_worker_setup"
            ray.init(include_dashboard=False, runtime_env=runtime_env, **kw)
            self._started = True
        else:  # someone else's instance: the environment goes with each task
            options["runtime_env"] = {"env_vars": env}
        self._task = ray.remote(attempt).options(**options)
        return self

    def __exit__(self, exc_type, *_) -> None:
        import ray

        if exc_type is not None:  # stopped by an exception (Ctrl-C): cancel what is in flight
            for ref in self._refs:
                try:
                    ray.cancel(ref, force=True)
                except Exception:  # already finished, or its worker is gone
                    pass
        self._refs.clear()
        if self._started:
            ray.shutdown()
            self._started = False

    def warm(self, n: int) -> None:
        if self._started:  # a local instance: its workers share this machine's temp folder
            _warm_up(self, min(n, self.workers or max(1, cores() // self.threads)))

    def submit(self, fn, args):
        ref = self._task.remote(fn, args, self.threads)
        self._refs.add(ref)
        return ref

    def wait(self, handles: list) -> list[int]:
        import ray

        done, _ = ray.wait(handles, num_returns=1)
        return [handles.index(ref) for ref in done]

    def result(self, handle) -> Attempt:
        import ray

        self._refs.discard(handle)
        try:
            return ray.get(handle)
        except ray.exceptions.RayError as e:  # the worker died, the task was cancelled ...
            return Attempt(error=f"{type(e).__name__}: {e}")


def require_ray() -> None:
    """Refuse the ``ray`` executor, naming the install, where Ray is not installed."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise ValueError("executor 'ray' needs Ray, which is not installed: pip install "
                         "'excise[ray]' (or choose executor serial or local)")


def make_executor(name: str, workers: int | None = None, threads: int | None = None,
                  env: dict | None = None, preload: Sequence[str] = ()) -> Executor:
    """An executor by name (:data:`EXECUTORS`), checked now, started when entered. ``workers``:
    cells at a time (``local``; ``ray``: the CPUs of a local instance started here, /
    ``threads``); ``threads``: torch threads per cell (None: the count in effect now);
    ``preload``: modules a worker imports as it starts."""
    if name == "serial":
        return SerialExecutor(threads)
    if name == "local":
        return LocalExecutor(workers, threads, env, preload)
    if name == "ray":
        return RayExecutor(workers, threads, env, preload)
    raise ValueError(f"executor={name!r}: choose one of {', '.join(EXECUTORS)}")


def dispatch(cells: Sequence[Cell], executor: Executor, *, retries: int = 1,
             log: Callable[[str], None] | None = None,
             on_done: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Run ``cells`` on ``executor`` (entered here) and return their outcomes in the cells'
    order. A failed attempt is retried up to ``retries`` times; ``log`` gets one line per
    failure, ``on_done`` each outcome as it is settled (in the order cells finish)."""
    log = log or (lambda m: None)
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries={retries!r}: need an integer >= 0 (the extra tries a "
                         f"failing cell gets)")
    seen: set[str] = set()
    for c in cells:
        if c.key in seen:
            raise ValueError(f"two cells named {c.key!r}: cell keys must be unique")
        missing = [n for n in c.needs if n not in seen]
        if missing:
            raise ValueError(f"cell {c.key!r} needs {missing[0]!r}, which is not an earlier "
                             f"cell")
        seen.add(c.key)
    outcomes: dict[str, Outcome] = {}
    tries = dict.fromkeys(seen, 0)
    waiting = list(cells)
    pending: list[tuple[Any, Cell]] = []

    def settle(o: Outcome) -> None:
        outcomes[o.key] = o
        if on_done is not None:
            on_done(o)

    def submit(c: Cell) -> None:
        tries[c.key] += 1
        inputs = tuple(outcomes[n].value for n in c.needs)
        pending.append((executor.submit(c.fn, tuple(c.args) + inputs), c))

    with executor:
        executor.warm(len(cells))
        while waiting or pending:
            for c in list(waiting):
                failed = [n for n in c.needs if n in outcomes and not outcomes[n].ok]
                if failed:
                    waiting.remove(c)
                    settle(Outcome(c.key, error=f"not run: it needs {failed[0]!r}, which "
                                                f"failed ({outcomes[failed[0]].error})"))
                elif all(n in outcomes for n in c.needs):
                    waiting.remove(c)
                    submit(c)
            if not pending:
                continue
            finished = executor.wait([h for h, _ in pending])
            done = [pending[i] for i in finished]
            pending[:] = [p for i, p in enumerate(pending) if i not in finished]
            for handle, c in done:
                a = executor.result(handle)
                if a.error is None:
                    settle(Outcome(c.key, a.value, attempts=tries[c.key], seconds=a.seconds))
                elif tries[c.key] <= retries:
                    log(f"{c.key}: failed (try {tries[c.key]} of {retries + 1}): {a.error}; "
                        f"trying again")
                    submit(c)
                else:
                    log(f"{c.key}: failed after {tries[c.key]} tries: {a.error}"
                        + (f"\n{a.trace}" if a.trace else ""))
                    settle(Outcome(c.key, error=a.error, trace=a.trace, attempts=tries[c.key],
                                   seconds=a.seconds))
    return [outcomes[c.key] for c in cells]


__all__ = ["Attempt", "Cell", "EXECUTORS", "Executor", "LocalExecutor", "Outcome",
           "RayExecutor", "SerialExecutor", "attempt", "cores", "dispatch", "make_executor",
           "require_ray", "worker_env"]
