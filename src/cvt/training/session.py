"""What a training or test process sets up around its work: logging to the run folder, seeded
generators and cuDNN switches, its CPU thread count, and the signals that ask a run to stop after the
current step."""
from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import sys
import threading
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
from ..models.complexity import count_gmacs

__all__ = ["StopSignals", "choose_cpu_threads", "cpu_threads", "reproducibility", "run_logging"]

# Below this many multiply-adds per step (forward, one process) a model's operations are too small to
# share well between threads: on an idle machine two threads gain the digits demo (0.4 GMAC per step)
# only about a third, and two threads waiting on each other collapse when another program takes one of
# the cores (benchmarks/RESULTS.md, "CPU threads under competition").
SMALL_STEP_GMACS = 2.0

log = logging.getLogger("cvt")


class StopSignals:
    """Turns the first SIGINT/SIGTERM into a request to stop after the current step; a second one
    aborts immediately. Installed only in the main thread (Python delivers signals only there).

    Under torchrun a Ctrl-C reaches every worker twice, from the terminal and forwarded by the agent,
    so there repeats are ignored: the agent itself escalates to SIGKILL after its shutdown timeout.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._repeat_aborts = "TORCHELASTIC_RUN_ID" not in os.environ

    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            if self._repeat_aborts:
                raise KeyboardInterrupt
            return
        self.signum = signum
        log.warning(
            "%s received: stopping after the current step%s", signal.Signals(signum).name,
            " (send it again to abort now)" if self._repeat_aborts else "",
        )

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


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
            file_handler = logging.FileHandler(folder / "log.txt", encoding="utf-8")
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
    step_gmacs = count_gmacs(model, image_size) * batch
    return 1 if step_gmacs < SMALL_STEP_GMACS else usable_cores()


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
