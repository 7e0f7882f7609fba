#!/usr/bin/env bash
# The GPU measurements the speed and small-GPU issues still owe, as ONE device call (the device tool:
# one H100 or H200, 15 minutes of device time a session, 10 minutes a command). CPU sessions prepare
# and test everything else; this script only measures.
#
#   bash benchmarks/gpu_checks.sh speed            # ~6 min on an H100: bf16 vs fp8, cuDNN vs tokamax attention
#   bash benchmarks/gpu_checks.sh cache warm       # step caching on the full loop; cold vs warm start
#   bash benchmarks/gpu_checks.sh memory           # 1024², 28 steps, bf16/int8/int4 peaks (~10 min: alone)
#   bash benchmarks/gpu_checks.sh train            # LoRA / full step time and MFU
#
# The device image has jax (CUDA), flax, optax, orbax, torch and transformers, but not qwix, tokamax,
# diffusers or their small dependencies: before the call, download them here for its Python 3.12 into
# .whl/ (git-ignored through .git/info/exclude) and pass carry [".whl"] to the run:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     --platform any -d .whl qwix==0.1.8 tokamax==0.0.12 diffusers==0.42.1 einshape immutabledict \
#     typeguard==2.13.3 pydantic pydantic-core annotated-types typing-inspection tensorboardx importlib-metadata grain
#
# Each stage's output goes to $OUT/<stage>.log (the device tool brings $OUT back); numbers go to
# benchmarks/RESULTS.md by hand, with the card that gave them.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
PY=${PYTHON:-python3}

if [ -d .whl ]; then
    $PY -m pip install -q --no-deps --no-index .whl/*.whl 2>&1 | tail -2
fi
$PY -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
$PY -c "import jax, flax, qwix; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__)" | tee -a "$OUT/device.txt"

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, keep going after a failure
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*" | tee "$OUT/$name.log"
    timeout "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
    echo "== $name: exit ${PIPESTATUS[0]}" | tee -a "$OUT/$name.log"
}

for name in "${@:-speed}"; do
    case $name in
        speed)   # issue 10 points 1, 2, 6: the forward, bf16 vs fp8 weights+activations, cuDNN vs tokamax
            stage speed 420 $PY benchmarks/transformer.py --gpu --repeats 10 \
                --quantize none fp8 --attention cudnn tokamax --breakdown
            for mode in bf16 fp8; do  # the top kernels: where the time goes, and that fp8 GEMMs are float8 ones
                stage "profile_$mode" 150 $PY benchmarks/profile_transformer.py "/tmp/trace_$mode" \
                    $([ $mode = fp8 ] && echo --quantize fp8)
            done ;;
        cache)   # issue 10 point 3: steps computed of 28 and time, First-Block-Cache and TaylorSeer
            stage cache 400 $PY benchmarks/cache.py --gpu ;;
        warm)    # issue 10 point 5: launch to first step, cold vs warm compile cache (a converted random model)
            stage warm 500 $PY benchmarks/warm_start.py --size 1024 --steps 28 --dtype bf16 ;;
        memory)  # issue 9: device peak and seconds an image, bf16 / int8 / int4 at real size
            stage memory 590 $PY benchmarks/memory.py --gpu --dir /tmp ;;
        train)   # issue 8: step time and MFU, full and LoRA
            stage train 500 $PY benchmarks/train.py --gpu ;;
        *) echo "unknown stage $name (speed, cache, warm, memory, train)" >&2; exit 2 ;;
    esac
done
