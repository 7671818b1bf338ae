"""Training and evaluation: epochs, optimizer and schedule, checkpoints and resume, distributed runs.

`train(cfg)` and `test(cfg)` are what `cvt train` and `cvt test` call.
"""
from .loop import evaluate, train_one_epoch
from .train import TrainingInterrupted, build_model, test, train

__all__ = ["TrainingInterrupted", "build_model", "evaluate", "test", "train", "train_one_epoch"]
