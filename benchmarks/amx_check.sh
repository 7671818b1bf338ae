#!/usr/bin/env bash
# Issue 16's measurement on an Intel AMX CPU, as one command for a borrowed machine (e.g. a GPU host):
# both token-linear branches of kernels.token_linear, eager, CvT-13 at 224, batch 16, two threads
# pinned to two logical CPUs like the 2-vCPU machines the issue measured. Each run appends its table to
# benchmarks/RESULTS.md; with $OUT set (the device tool) that file is copied there to bring it back.
#
#     bash benchmarks/amx_check.sh            # ~3-4 min where AMX is present; exits at once where not
#
# Keep the branch that wins as cpu_has_amx's default (src/cvt/models/kernels.py) and record the table.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

# Whatever happens below, bring back what was appended.
trap '[[ -n "${OUT:-}" ]] && cp benchmarks/RESULTS.md "$OUT/"' EXIT

grep -m1 "model name" /proc/cpuinfo || true
# Two allowed logical CPUs, one core's two hyperthreads where it has them (a 2-vCPU VM is usually
# that); empty where cvt would not take the AMX branch (no AMX, or the kernel does not grant it).
cpus=$(python - <<'PY'
import os, sys, torch
from cvt.models.kernels import cpu_has_amx
print("torch", torch.__version__, "| cpu_has_amx:", cpu_has_amx(), file=sys.stderr)
if cpu_has_amx():
    allowed = sorted(os.sched_getaffinity(0))
    def siblings(cpu):
        try:
            text = open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read().strip()
        except OSError:
            return []
        ids = []
        for part in text.split(","):
            low, _, high = part.partition("-")
            ids += range(int(low), int(high or low) + 1)
        return [c for c in ids if c in allowed]
    pair = next((s[:2] for s in map(siblings, allowed) if len(s) >= 2), allowed[:2])
    print(",".join(map(str, pair)))
PY
)
if [[ -z "$cpus" ]]; then
    echo "no usable AMX here: nothing to measure"
    exit 0
fi
echo "pinned to CPUs $cpus"

for branch in off on; do
    taskset -c "$cpus" python benchmarks/bench_model.py --sizes 224 --no-compile --no-memory --rounds 5 \
        --threads 2 --amx-branch "$branch" --note "issue 16 AMX A/B, token linears: amx branch $branch, CPUs $cpus"
done
