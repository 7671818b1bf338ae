"""benchmarks/gpu_check.py, the one-command check of every CUDA claim, run here as its CPU twin: the
same sections at tiny sizes, so its logic is known to work before a GPU is at hand."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from helpers import REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.py"
STATUSES = {"pass", "FAIL", "info"}


@pytest.mark.slow
def test_cpu_run_passes_every_section_and_writes_the_report(tmp_path):
    report_file = tmp_path / "check.json"
    results = REPO / "benchmarks" / "RESULTS.md"
    before = results.read_text(encoding="utf-8")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--no-write", "--json", str(report_file)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(report_file.read_text())
    assert report["verdict"] == "pass"
    assert report["versions"]["device"] == "cpu" and report["versions"]["torch"] == torch.__version__
    assert set(report["sections"]) == {"logits", "syncs", "demo", "torchrun", "perf", "compiled"}
    assert all(s["status"] == "done" for s in report["sections"].values())
    checks = {c["name"]: c for c in report["checks"]}
    assert all(c["status"] in STATUSES for c in checks.values())
    assert not [c for c in checks.values() if c["status"] == "FAIL"]
    # On one device the "device" model is the reference itself: equal to the last bit.
    assert float(checks["fp32 logits (TF32 off) vs CPU fp32"]["value"]) == 0.0
    assert float(checks["fp32 training-step gradients vs CPU"]["value"]) == 0.0
    assert checks["bfloat16 autocast logits vs CPU fp32"]["status"] == "pass"
    demo = [c for c in report["checks"] if c["section"] == "demo"]
    assert len(demo) == 3 and all(c["status"] == "pass" for c in demo)  # both trainings rise, resume is exact
    assert [c["status"] for c in report["checks"] if c["section"] == "torchrun"] == ["pass", "pass"]
    # Speed and memory have CUDA targets only: reported, not judged, on CPU.
    assert {c["status"] for c in report["checks"] if c["section"] == "perf" and "peer" in c["name"]} <= {"pass", "info"}
    assert "| section | check | value | limit | result | detail |" in proc.stdout
    assert results.read_text(encoding="utf-8") == before  # --no-write


@pytest.fixture
def gpu_check(monkeypatch):
    """The script as a module. Importing it puts src/ first on sys.path and sets PYTHONPATH and
    CUBLAS_WORKSPACE_CONFIG for its subprocesses; the monkeypatch undoes all that afterwards."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(os, "environ", dict(os.environ))
    import gpu_check

    return gpu_check


def test_sections_the_budget_cannot_fit_are_skipped_and_reported(gpu_check, tmp_path):
    report = gpu_check.Report(torch.device("cpu"), gpu_check.CPU_SIZES, deadline=time.monotonic() + 2.0)
    gpu_check.run_sections(report, ["syncs", "demo"], tmp_path)
    assert report.sections["syncs"]["status"] == "done"  # ~1 s: fits
    assert report.sections["demo"]["status"] == "skipped" and "budget" in report.sections["demo"]["reason"]
    assert report.verdict == "incomplete"
    table = gpu_check.render(report, {"date (UTC)": "now", "device": "cpu"}, 2.0, 2.0)
    assert "| demo | (section) | skipped |" in table and "incomplete" in table


def test_a_failing_section_is_a_failed_check_and_the_run_goes_on(gpu_check, monkeypatch, tmp_path):
    def broken(report):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def out_of_time(report):
        raise gpu_check.BudgetSpent

    monkeypatch.setattr(gpu_check, "check_logits", broken)
    monkeypatch.setattr(gpu_check, "check_perf", out_of_time)
    report = gpu_check.Report(torch.device("cpu"), gpu_check.CPU_SIZES, deadline=time.monotonic() + 60)
    gpu_check.run_sections(report, ["logits", "perf", "syncs"], tmp_path)
    assert report.sections["logits"]["status"] == "error" and "illegal memory access" in report.sections["logits"]["reason"]
    assert [c.status for c in report.checks if c.section == "logits"] == ["FAIL"]
    assert report.sections["perf"]["status"] == "stopped"
    assert report.sections["syncs"]["status"] == "done"
    assert report.verdict == "FAIL"


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                        ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12),
                                        ("NVIDIA L4", None)])
def test_bf16_peak_by_device_name(gpu_check, monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert gpu_check.bf16_peak(torch.device("cuda", 0)) == peak


@pytest.mark.slow
@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                    reason="the profile is of bf16 autocast, which this CPU only emulates: minutes instead of seconds")
def test_gpu_profile_runs_its_variants_on_cpu():
    """benchmarks/gpu_profile.py's logic at tiny sizes: each variant prints its step time, the profiled
    ones their kernel tables."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_profile.py"), "--device", "cpu", "--batch", "2",
                           "--large-batch", "2", "--size", "32", "--steps", "1", "--rows", "3", "--skip-compile"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line.split("ms/step")[0].split() for line in proc.stdout.splitlines() if "ms/step" in line]
    labels = {" ".join(words[:-1]) for words in lines}
    assert labels == {"ours eager train", "peer eager train", "ours eager infer", "peer eager infer",
                      "ours eager, cudnn.benchmark train", "peer eager, cudnn.benchmark train",
                      "ours eager, cudnn.benchmark infer", "peer eager, cudnn.benchmark infer",
                      "ours eager, NCHW depthwise train", "ours eager, NCHW depthwise infer",
                      "ours eager, batch 2 train", "peer eager, batch 2 train"}
    assert proc.stdout.count("Self CPU time total") == 5
