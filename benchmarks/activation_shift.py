"""How far does exact GELU move a CvT's outputs from QuickGELU, on the same weights?

The published checkpoints were trained with QuickGELU; transformers' port runs them with exact GELU.
This measures the difference that makes on CvT-13 in the published layout: the same weights run both
ways on the same images; logits compared (max and mean absolute difference, relative to the logits'
own spread), top-1 agreement and top-5 overlap.

Without network the real checkpoints are not at hand, so the weights are random:

* ``init``: the release's initialisation (trunc-normal .02 linears) with random BatchNorm statistics;
  its MLP pre-activations are small (std ~0.4), where GELU and QuickGELU nearly agree;
* ``fc1 x4``: the same with fc1 weights x4, pre-activations of std ~1.5, around where the two
  functions differ most (|GELU - QuickGELU| peaks at ~0.02 near |x| = 2 and vanishes for large |x|).

The table gives the measured standard deviation of the fc1 outputs (the activation's inputs).

    python benchmarks/activation_shift.py [--images 64] [--size 224] [--no-write]
"""
from __future__ import annotations

import argparse
import datetime

import torch

from common import append_to_section, cpu_model, git_revision, markdown_table

import cvt

HEADING = "GELU against QuickGELU on the same weights"


FC1_SCALES = {"init": 1.0, "fc1 x4": 4.0}


def _weights(kind: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = cvt.create_model("cvt-13")
    state = model.state_dict()
    for key, value in state.items():
        if key.endswith("running_mean"):
            value.normal_()
        elif key.endswith("running_var"):
            value.uniform_(0.5, 2.0)
        elif key.endswith("mlp.fc1.weight"):
            value.mul_(FC1_SCALES[kind])
    return state


@torch.no_grad()
def _logits(state: dict[str, torch.Tensor], act: str, images: torch.Tensor, batch: int) -> tuple[torch.Tensor, float]:
    """Logits, and the standard deviation of every fc1 output (the activation's input)."""
    model = cvt.create_model("cvt-13", act=act).eval()
    cvt.load_checkpoint(model, state, act=act)
    sums = torch.zeros(2, dtype=torch.float64)
    count = 0
    for module in model.modules():
        if hasattr(module, "fc1"):  # an Mlp
            def record(mod: torch.nn.Module, inputs: tuple[torch.Tensor, ...], _out: object) -> None:
                nonlocal count
                pre = torch.nn.functional.linear(inputs[0], mod.fc1.weight, mod.fc1.bias).double()
                sums[0] += pre.sum()
                sums[1] += pre.square().sum()
                count += pre.numel()
            module.register_forward_hook(record)
    logits = torch.cat([model(images[i:i + batch]) for i in range(0, len(images), batch)])
    mean = sums[0] / count
    return logits, float((sums[1] / count - mean**2).sqrt())


def measure(kind: str, images: torch.Tensor, batch: int) -> list[str]:
    state = _weights(kind)
    (quick, pre_std), (exact, _) = (_logits(state, act, images, batch) for act in ("quick_gelu", "gelu"))
    diff = (exact - quick).abs()
    spread = quick.std(dim=1, keepdim=True)
    top1 = (exact.argmax(1) == quick.argmax(1)).float().mean().item() * 100
    top5 = [len(set(a.tolist()) & set(b.tolist())) / 5 for a, b in zip(exact.topk(5).indices, quick.topk(5).indices)]
    return [
        kind, f"{pre_std:.2f}", f"{diff.max().item():.3g}", f"{diff.mean().item():.3g}", f"{(diff / spread).mean().item():.3g}",
        f"{top1:.1f}%", f"{100 * sum(top5) / len(top5):.1f}%",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--no-write", action="store_true", help="print only, do not append to RESULTS.md")
    args = parser.parse_args()
    torch.manual_seed(1)
    images = torch.randn(args.images, 3, args.size, args.size)  # normalised-image statistics
    rows = [measure(kind, images, args.batch) for kind in FC1_SCALES]
    table = markdown_table(
        ["weights", "fc1 output std", "max abs logit diff", "mean abs logit diff", "mean diff / logit std", "top-1 agreement", "top-5 overlap"], rows
    )
    text = (
        f"#### Run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC: CvT-13, {args.images} random "
        f"{args.size}x{args.size} images, {cpu_model()}, torch {torch.__version__}, repo {git_revision()}\n\n{table}\n"
    )
    print(text)
    if not args.no_write:
        append_to_section(HEADING, text)


if __name__ == "__main__":
    main()
