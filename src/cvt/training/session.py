"""What a training or test process sets up around its work: the lock on the run folder, logging to
it, seeded generators and cuDNN switches, its CPU thread count and allocator, and the signals that ask
a run to stop after the current step."""
from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import random
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch
from yacs.config import CfgNode

from ..data import usable_cores
from ..errors import UserError
from ..files import ensure_folder
from ..models.complexity import model_summary
from ..models.kernels import freed_memory_reused_below

try:
    import fcntl
except ImportError:  # Windows: runs there go unlocked
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "LOCK_FILE",
    "StopSignals",
    "TrainingInterrupted",
    "choose_cpu_threads",
    "cpu_threads",
    "keep_freed_memory",
    "lock_run_folder",
    "reproducibility",
    "run_logging",
]

# Below this many multiply-adds per step (forward, one process) a model's operations are too small to
# share well between threads: on an idle machine two threads gain the digits demo (0.4 GMAC per step)
# only about a third, and two threads waiting on each other collapse when another program takes one of
# the cores (benchmarks/RESULTS.md, "CPU threads under competition").
SMALL_STEP_GMACS = 2.0

log = logging.getLogger("cvt")

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on SIGINT/SIGTERM after saving a resumable checkpoint.

    A KeyboardInterrupt, so the CLI's Ctrl-C handling (exit code 130) covers it.
    """

    def __init__(self, signum: int, checkpoint: Path | None) -> None:
        self.signum = signum
        self.checkpoint = checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name}; resume from {checkpoint}")


class StopSignals:
    """Turns the first SIGINT/SIGTERM/SIGHUP into a request to stop after the current step; a second
    one aborts immediately. Installed only in the main thread (Python delivers signals only there).
    SIGHUP (a closed terminal or ssh session) gets the same resumable save as SIGTERM.

    Under torchrun a Ctrl-C reaches every worker twice, from the terminal and forwarded by the agent,
    so there repeats are ignored: the agent itself escalates to SIGKILL after its shutdown timeout.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._repeat_aborts = "TORCHELASTIC_RUN_ID" not in os.environ
        self._received = threading.Event()
        self._announcer: threading.Thread | None = None

    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            if self._repeat_aborts:
                raise KeyboardInterrupt
            return
        self.signum = signum
        # Not logged here: the signal may land while a log handler is mid-write, and writing to that
        # stream again from this thread fails ("reentrant call"). Another thread waits its turn.
        self._received.set()

    def _announce(self) -> None:
        self._received.wait()
        if self.signum is not None:
            log.warning(
                "%s received: stopping after the current step%s", signal.Signals(self.signum).name,
                " (send it again to abort now)" if self._repeat_aborts else "",
            )

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            # A thread rather than one started by the handler: starting a thread takes threading's own
            # locks, which the interrupted code may hold.
            self._announcer = threading.Thread(target=self._announce, name="cvt-stop-announcer", daemon=True)
            try:
                self._announcer.start()
                for signum in STOP_SIGNALS:
                    self._previous[signum] = signal.signal(signum, self._handle)
            except BaseException:  # a signal before every handler was in place
                self.__exit__()
                raise
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        if self._announcer is not None and self._announcer.is_alive():
            self._received.set()
            self._announcer.join()


LOCK_FILE = ".lock"

# The descriptors of the run-folder locks this process holds. A forked child (a data-loader worker)
# would share each one's flock and hold it after this process died, a few seconds until the worker
# noticed: a rerun or torchrun restart in that window was refused as "in use". Children close them.
_HELD_LOCKS: set[int] = set()


def _close_held_locks_in_child() -> None:
    for fd in _HELD_LOCKS:
        with contextlib.suppress(OSError):
            os.close(fd)  # the child's copy only: the parent's flock stays
    _HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_close_held_locks_in_child)


@contextlib.contextmanager
def lock_run_folder(folder: Path) -> Iterator[str | None]:
    """Hold `folder`/.lock while the body runs, so two runs never write one folder; yields a line to
    log when a crashed run's lock was taken over, else None.

    An flock on the file is the lock: the system releases it when its holder dies, however it dies,
    so a lock file whose flock is free is stale (children it forks, data-loader workers, close their
    copy). The file names its holder (pid, host) for the error the second run gets, and is removed on
    exit while still locked.
    """
    if fcntl is None:
        yield None
        return
    path = ensure_folder(folder) / LOCK_FILE
    fd, previous = _acquire(path, folder)
    _HELD_LOCKS.add(fd)
    holder = os.getpid()
    try:
        yield None if not previous else (
            f"took over the lock of an earlier run that is no longer running ({_holder(previous)})"
        )
    finally:
        if os.getpid() == holder:  # a forked child leaving the block must not remove its parent's lock
            path.unlink(missing_ok=True)
            _HELD_LOCKS.discard(fd)
            os.close(fd)  # releases the flock


def _acquire(path: Path, folder: Path) -> tuple[int, str]:
    """(descriptor holding the flock, what the file said before)."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise UserError(f"cannot lock run folder {folder}: {e.strerror or e}; choose a writable OUTPUT_DIR") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
            os.close(fd)
            raise UserError(
                f"run folder {folder} is in use by another run ({holder}); wait for it to end or stop it, "
                "or give this run another NAME / OUTPUT_DIR"
            ) from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # its holder removed the file as we locked it: lock the new one
    previous = os.pread(fd, 4096, 0).decode("utf-8", "replace")
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    return fd, previous


def _holder(text: str) -> str:
    try:
        record = json.loads(text)
        return f"pid {record['pid']} on host {record['host']}, started {record['started']}"
    except (ValueError, TypeError, KeyError):
        return "holder unknown"


@contextlib.contextmanager
def run_logging(folder: Path | None, is_main: bool) -> Iterator[None]:
    """Log to `folder`/log.txt and to the console on rank 0; other ranks report warnings only. An
    error that ends the run is written to log.txt too (with its traceback unless it is a UserError)."""
    logger = logging.getLogger("cvt")
    previous_level = logger.level
    handlers: list[logging.Handler] = []
    file_handler: logging.Handler | None = None
    if is_main:
        logger.setLevel(logging.INFO)
        if not logger.hasHandlers():  # called as a library: nobody prints to the console yet
            handlers.append(logging.StreamHandler())
        if folder is not None:
            ensure_folder(folder)
            # backslashreplace: a file name that is not UTF-8 is logged escaped, not lost in a logging error
            file_handler = logging.FileHandler(folder / "log.txt", encoding="utf-8", errors="backslashreplace")
            file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            handlers.append(file_handler)
    else:
        logger.setLevel(logging.WARNING)
    for handler in handlers:
        logger.addHandler(handler)
    try:
        yield
    except Exception as error:
        if file_handler is not None:  # the console hears of it from the caller: the CLI's line, or a traceback
            file_handler.handle(logger.makeRecord(
                logger.name, logging.ERROR, __file__, 0, "stopped by an error: %s", (error,),
                None if isinstance(error, UserError) else sys.exc_info(),
            ))
        raise
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
            handler.close()
        logger.setLevel(previous_level)


def choose_cpu_threads(requested: int, model: torch.nn.Module, image_size: tuple[int, int], batch: int) -> int:
    """CPU_THREADS when set (> 0), else 1 for a model as small as the demo, else the usable cores."""
    if requested > 0:
        return requested
    step_gmacs = model_summary(model.spec, 0, image_size)["gmacs"] * batch  # counted on the meta device
    return 1 if step_gmacs < SMALL_STEP_GMACS else usable_cores()


# glibc's mallopt parameters (malloc.h) and the values `keep_freed_memory` sets: the heap's free top kept
# up to 2 GiB - 1 (mallopt takes an int), and no mmap below 1 GiB, or below 32 MiB, the most older glibc
# releases accept.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEPT_TOP_BYTES = 2**31 - 1
_MMAP_THRESHOLDS = (2**30, 32 * 2**20)


def keep_freed_memory() -> int:
    """Have glibc's malloc keep the memory the process frees for later use instead of handing it back
    to the system; returns the mmap threshold set, in bytes (0: nothing changed, as on another C
    library, or where the environment sets malloc up).

    By default glibc serves big tensors with fresh mmaps and trims the heap's free top, so a step's big
    activations and gradients fault their pages in anew every step, a few percent of a training step
    and a tenth of inference on the CPU (benchmarks/RESULTS.md). The process keeps the memory instead;
    it settles at about the peak the steps need. Lasts for the process and the data-loader workers it
    forks, so the `cvt` command sets it for the commands that run a model (its process is theirs), and
    a Python caller who wants it calls this; the MALLOC_*_ environment variables, or another allocator
    preloaded, take precedence. The model's kernels are told, as they keep more for a backward where
    memory is reused (`freed_memory_reused_below`).
    """
    if not sys.platform.startswith("linux") or any(
        name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD")
    ):
        return 0
    libc = ctypes.CDLL(None)  # the process's own C library
    if not hasattr(libc, "gnu_get_libc_version"):
        return 0
    for threshold in _MMAP_THRESHOLDS:
        if libc.mallopt(_M_MMAP_THRESHOLD, threshold) == 1:
            libc.mallopt(_M_TRIM_THRESHOLD, _KEPT_TOP_BYTES)
            freed_memory_reused_below(threshold)  # the kernels may now keep big tensors for a backward
            return threshold
    return 0


@contextlib.contextmanager
def cpu_threads(
    requested: int, model: torch.nn.Module, image_size: tuple[int, int], batch: int, device: torch.device,
    announce: bool = True,
) -> Iterator[int]:
    """torch's intra-op thread count for a run on the CPU (see `choose_cpu_threads`), logged when
    `announce`, and the previous count back afterwards. On a GPU the CPU only feeds it: the count is
    left alone."""
    previous = torch.get_num_threads()
    if device.type != "cpu":
        yield previous
        return
    threads = choose_cpu_threads(requested, model, image_size, batch)
    torch.set_num_threads(threads)
    log.log(logging.INFO if announce else logging.DEBUG, "CPU threads: %d (%s; %d usable cores)", threads,
             "CPU_THREADS" if requested > 0 else "chosen for this model's size, CPU_THREADS 0", usable_cores())
    try:
        yield threads
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def reproducibility(cfg: CfgNode, rank: int) -> Iterator[None]:
    """Seed every generator from SEED (offset by rank, so ranks augment and drop differently) and set
    the cuDNN / deterministic-algorithm switches; the process-wide switches are restored afterwards."""
    seed = int(cfg.SEED) + rank
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.enabled,
    )
    if cfg.DETERMINISTIC:
        # cuBLAS needs a fixed workspace to be deterministic; it reads this when CUDA starts.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    else:
        torch.backends.cudnn.benchmark = bool(cfg.CUDNN.BENCHMARK)
        torch.backends.cudnn.deterministic = bool(cfg.CUDNN.DETERMINISTIC)
    torch.backends.cudnn.enabled = bool(cfg.CUDNN.ENABLED)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.backends.cudnn.enabled = previous[1:]
