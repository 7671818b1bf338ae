"""Training and evaluation: `run` (train and test a config), `session` (process set-up), `loop` (one
epoch, one evaluation), `optim` (optimizer and schedule), `state` (checkpoint.pth and resume),
`distributed` (torchrun's process group)."""
