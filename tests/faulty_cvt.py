"""`python tests/faulty_cvt.py ARGS` is `cvt ARGS` with faults injected at chosen moments, for
tests/test_reliability.py. The faults are chosen by environment variables, so the same script runs
alone and under torchrun:

* ``CVT_FAULT_KILL_AFTER_STEPS=N``: SIGKILL this process right after its N-th optimizer step;
* ``CVT_FAULT_KILL_IN_SAVE=N``: SIGKILL this process while it writes its N-th ``checkpoint.pth``, after the
  data went to the temporary file and before that file is synced and renamed into place;
* ``CVT_FAULT_NAN_AT_CALL=N``: the N-th training loss this process computes is NaN;
* ``CVT_FAULT_RANK=R``: inject only on global rank R (default: every rank).

Counts are per process, from 1. A kill happens only on the first attempt of a torchrun job
(TORCHELASTIC_RESTART_COUNT 0 or unset), so a restarted job runs clean.
"""
from __future__ import annotations

import importlib
import os
import signal
import sys
from pathlib import Path

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from cvt.cli import main

# The module, not the function `cvt.training.train` that the package exports under the same name.
engine_train = importlib.import_module("cvt.training.run")


def _setting(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_after_steps(steps: int) -> None:
    taken = 0

    def hook(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        nonlocal taken
        taken += 1
        if taken == steps:
            _die()

    register_optimizer_step_post_hook(hook)


def _kill_in_save(save_number: int) -> None:
    """Die inside cvt.files' atomic write of checkpoint.pth: its fsync of the temporary file is the moment
    the bytes are written but neither durable nor in place."""
    real_fsync = os.fsync
    saves = 0

    def fsync(fd: int) -> None:
        nonlocal saves
        name = Path(os.readlink(f"/proc/self/fd/{fd}")).name
        if name.startswith(".checkpoint.pth.") and name.endswith(".tmp"):
            saves += 1
            if saves == save_number:
                _die()
        real_fsync(fd)

    os.fsync = fsync


class _NanAtCall(nn.Module):
    def __init__(self, criterion: nn.Module, call: int) -> None:
        super().__init__()
        self.criterion, self.call, self.calls = criterion, call, 0

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        loss = self.criterion(output, target)
        return loss * float("nan") if self.calls == self.call else loss


def _nan_at_call(call: int) -> None:
    build = engine_train.build_criterion
    engine_train.build_criterion = lambda *args, **kwargs: _NanAtCall(build(*args, **kwargs), call)


def install() -> None:
    rank = _setting("CVT_FAULT_RANK")
    if rank is not None and rank != int(os.environ.get("RANK", "0")):
        return
    first_attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0
    if (steps := _setting("CVT_FAULT_KILL_AFTER_STEPS")) and first_attempt:
        _kill_after_steps(steps)
    if (save_number := _setting("CVT_FAULT_KILL_IN_SAVE")) and first_attempt:
        _kill_in_save(save_number)
    if call := _setting("CVT_FAULT_NAN_AT_CALL"):
        _nan_at_call(call)


if __name__ == "__main__":
    install()
    sys.exit(main())
