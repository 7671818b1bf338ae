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

grep -m1 "model name" /proc/cpuinfo || true
python -c "import torch; print('torch', torch.__version__, '| AMX tiles (torch probe):', torch.cpu._is_amx_tile_supported())"
if ! grep -qw amx_tile /proc/cpuinfo; then
    echo "no amx_tile flag in /proc/cpuinfo: nothing to measure here"
    exit 0
fi

# cpu0 and its hyperthread sibling when it has one (a 2-vCPU VM is usually one core's two threads).
cpus=$(cat /sys/devices/system/cpu/cpu0/topology/thread_siblings_list 2>/dev/null || echo 0,1)
[[ "$cpus" == *[,-]* ]] || cpus=0,1
echo "pinned to CPUs $cpus"

for branch in off on; do
    taskset -c "$cpus" python benchmarks/bench_model.py --sizes 224 --no-compile --no-memory --rounds 5 \
        --threads 2 --amx-branch "$branch" --note "issue 16 AMX A/B, token linears: amx branch $branch, CPUs $cpus"
done
if [[ -n "${OUT:-}" ]]; then cp benchmarks/RESULTS.md "$OUT/"; fi
