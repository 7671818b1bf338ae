#!/usr/bin/env bash
# Launch `cvt train` or `cvt test` on one or more machines with torchrun: the published release's
# run.sh interface (-g, -t, -p, -i), plus the multi-node options.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: bash run.sh [-g N] [-t train|test] [-p PORT] [-i] [--nodes N] [--node-rank R]
                   [--master-addr HOST] [--] [cvt options and KEY VALUE overrides ...]

  -g, --gpus N          processes per machine, one per GPU (default 1; on a CPU-only machine,
                        N CPU processes talking through Gloo)
  -t, --job-type TYPE   train (default) or test
  -p, --port PORT       rendezvous port on the master machine (default $MASTER_PORT or 29500)
  -i, --install-deps    pip install -e . (this repository) first
      --nodes N         machines taking part (default $NODE_COUNT or 1)
      --node-rank R     this machine's index, 0 .. N-1 (default $NODE_RANK or 0)
      --master-addr H   address of machine 0 (default $MASTER_ADDR or 127.0.0.1)
  -h, --help            this help

Everything else goes to `cvt train|test`, e.g.
  bash run.sh -g 8 -t train --cfg experiments/imagenet/cvt/cvt-13-224x224.yaml TRAIN.LR 0.1
  bash run.sh -g 8 -t test --cfg experiments/imagenet/cvt/cvt-13-224x224.yaml TEST.MODEL_FILE cvt-13.pth
EOF
}

fail() {
    echo "run.sh: $1" >&2
    echo "run 'bash run.sh -h' for the options" >&2
    exit 2
}

need_value() {
    [[ $# -ge 2 && -n "$2" ]] || fail "$1 needs a value"
}

is_int() {
    [[ "$1" =~ ^[0-9]+$ ]]
}

GPUS=1
JOB_TYPE=train
PORT="${MASTER_PORT:-29500}"
INSTALL_DEPS=false
NODES="${NODE_COUNT:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
EXTRA_ARGS=()

while [[ $# -gt 0 ]]; do
    case "$1" in
        -g|--gpus) need_value "$@"; GPUS="$2"; shift 2 ;;
        -t|--job-type) need_value "$@"; JOB_TYPE="$2"; shift 2 ;;
        -p|--port) need_value "$@"; PORT="$2"; shift 2 ;;
        -i|--install-deps) INSTALL_DEPS=true; shift ;;
        --nodes) need_value "$@"; NODES="$2"; shift 2 ;;
        --node-rank) need_value "$@"; NODE_RANK="$2"; shift 2 ;;
        --master-addr) need_value "$@"; MASTER_ADDR="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        --) shift; EXTRA_ARGS+=("$@"); break ;;
        *) EXTRA_ARGS+=("$1"); shift ;;
    esac
done

[[ "$JOB_TYPE" == train || "$JOB_TYPE" == test ]] || fail "-t/--job-type must be train or test, not '$JOB_TYPE'"
is_int "$GPUS" && (( GPUS >= 1 )) || fail "-g/--gpus must be a whole number >= 1, not '$GPUS'"
is_int "$NODES" && (( NODES >= 1 )) || fail "--nodes must be a whole number >= 1, not '$NODES'"
is_int "$NODE_RANK" && (( NODE_RANK < NODES )) || fail "--node-rank must be in 0..$((NODES - 1)), not '$NODE_RANK'"
is_int "$PORT" && (( PORT >= 1 && PORT <= 65535 )) || fail "-p/--port must be a port number, not '$PORT'"

PYTHON="${PYTHON:-python3}"
if [[ "$INSTALL_DEPS" == true ]]; then
    "$PYTHON" -m pip install -e "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
fi

# torchrun (`torch.distributed.run`), found through the same interpreter as the package. A rank that
# fails has said why on its stderr (a user's mistake: one `error:` line); torchrun would bury that under
# a traceback of its own, so a failed rank ends the launch with one line and the rank's exit code.
exec "$PYTHON" -c '
import sys
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main
try:
    main(sys.argv[1:])
except ChildFailedError as failed:
    rank, failure = failed.get_first_failure()
    print(f"run.sh: rank {rank} exited with code {failure.exitcode}", file=sys.stderr)
    sys.exit(failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode)  # a signal: 128 + its number
' \
    --nnodes "$NODES" \
    --node_rank "$NODE_RANK" \
    --nproc_per_node "$GPUS" \
    --master_addr "$MASTER_ADDR" \
    --master_port "$PORT" \
    -m cvt.cli "$JOB_TYPE" "${EXTRA_ARGS[@]}"
