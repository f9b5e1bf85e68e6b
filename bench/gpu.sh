#!/usr/bin/env bash
# The GPU rows of bench/BENCHMARKS.md (sections 3, 4 and 6) in one command:
#
#     bash bench/gpu.sh JETS [OUT]
#
# JETS is a jets file of at least 10,000 jets, such as the one that
# `jethpo data generate --jets 10000 --out DIR` writes. The scripts write their JSON files
# to bench/results/ as usual. With OUT, those files, the logs and the GPU's name are copied
# there too. Each benchmark runs under its own time limit (GENERATION_S, TRAINING_S and
# MEMORY_S, in seconds), so one that runs long leaves time for the others, and the whole
# command ends within about 7 minutes with the defaults.
#
# The scripts need torch, numpy, h5py, psutil and PyYAML, and Optuna for the training and
# memory benchmarks. On a machine without a package index, set WHEELS to a folder of wheels
# for what is missing (for Optuna 5.1: optuna, alembic, sqlalchemy, mako and colorlog). They
# are installed into a temporary folder, not into the machine's Python.
#
# Set DEVICE=cpu to try the command on a machine without a GPU.
#
# NOTE: not yet run on a GPU, so the time limits are estimates. A limit that stops a
# benchmark shows as exit status 124 in the summary line of that benchmark.
set -u

if [ $# -lt 1 ] || [ ! -f "$1" ]; then
    echo "Usage: bash bench/gpu.sh JETS [OUT]. JETS must be an existing jets file of at least 10,000 jets; got '${1:-}'." >&2
    exit 2
fi
jets=$1
out=${2:-}
device=${DEVICE:-cuda}
python=${PYTHON:-python3}
cd "$(dirname "$0")/.." || exit 2

export PYTHONUNBUFFERED=1
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
if [ -n "${WHEELS:-}" ]; then
    site=$(mktemp -d)
    "$python" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$WHEELS"/*.whl || exit 1
    export PYTHONPATH=$PYTHONPATH:$site
fi

logs=bench/results/gpu-logs
results=(bench/results/gpu-generation-"$device".json bench/results/training-"$device".json
    bench/results/gpu-memory-"$device".json)
# so that a benchmark that fails leaves no older file to be taken for its result
rm -rf "$logs" "${results[@]}"
mkdir -p "$logs"
{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    nvidia-smi -L 2>/dev/null || echo "nvidia-smi: not available"
    "$python" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])"
} > "$logs/device.txt" 2>&1

status=0
run() {
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most $limit s): $*"
    timeout "$limit" "$python" -m "$@" > "$logs/$name.log" 2>&1
    local code=$?
    tail -n 25 "$logs/$name.log"
    if [ $code -ne 0 ]; then
        echo "== $name ended with exit status $code (124: the time limit); the full log is $logs/$name.log"
        status=1
    fi
}

run generation "${GENERATION_S:-200}" bench.generation --device "$device" \
    --batch-sizes 1 10 100 1000 10000 100000 --output gpu-generation
run training "${TRAINING_S:-150}" bench.training --device "$device" --jets "$jets" \
    --jets-per-epoch 6000 --repeats 3
run memory "${MEMORY_S:-90}" bench.memory --device "$device" --jets "$jets" --train-jets 3000 \
    --malloc worker --repeats 1 --output gpu-memory

if [ -n "$out" ]; then
    mkdir -p "$out"
    cp "$logs"/*.txt "$logs"/*.log "$out"/
    for file in "${results[@]}"; do
        if [ -f "$file" ]; then cp "$file" "$out"/; fi
    done
fi
exit $status
