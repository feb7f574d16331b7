#!/usr/bin/env bash
# The checks and timings of a lent GPU session (issue 6), in one command, so a short lease covers them all:
#
#   OUT=folder bash bench/gpu.sh PART...    (PART: checks | speed | memory | gm | dm; in the order given)
#
# checks  the CUDA tests, then every method end to end through the CLI on real MNIST (a few iterations,
#         a short evaluation), so a GPU-only failure shows up;
# speed   `python -m bench` on the GPU (fp32 and bf16) and the side-by-side official loops
#         (bench.dm_reference, bench.datadam_reference, bench.dc_reference) at IPC 10 and 50;
# memory  MTT's and DATM's peak memory and time against the official unroll (bench.mtt_reference);
# gm      gradient matching at larger budgets: DC at IPC 1 from noise for the papers' 1,000 iterations, DC and
#         DSA at IPC 10 from real images for 30 iterations each (issue 4);
# dm      DM at IPC 10 for 10,000 iterations (half the paper's 20,000; 271 s on an H100, then its evaluation) and
#         DataDAM's paper preset (8,000 iterations).
# Real MNIST is read from $DDLIB_DATA (default .gpu/data: copy ../shared/data/MNIST-gz/* to
# .gpu/data/MNIST/raw/ here and carry .gpu). Everything lands in $OUT/gpu-results.tgz (trajectories left
# out; rewritten after every step) plus $OUT/log.txt, since a lent machine returns at most 8
# files. Each step has its own time limit; a failed step is logged and the next one runs.
set -uo pipefail
out=${OUT:?set OUT to the folder that comes back}
work=$(mktemp -d)
export DDLIB_DATA=${DDLIB_DATA:-$PWD/.gpu/data} PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 DDLIB_PROGRESS=0 DDLIB_RESULTS=off
py=${PYTHON:-python3}
device=${DEVICE:-cuda} dataset=${DATASET:-mnist}  # DEVICE=cpu DATASET=digits: a dry run of `checks` anywhere

pack() {  # the results so far, replaced whole, so a call cut off at its limit still returns every finished step
    tar czf "$out/.results.tgz" -C "$work" --exclude=experts --exclude=bench-experts . &&
        mv "$out/.results.tgz" "$out/gpu-results.tgz"
}

step() {  # step SECONDS command...: run it with a limit, log it, keep going
    local limit=$1; shift
    echo "== $(date +%T) $*"
    timeout "$limit" "$@"
    echo "== rc=$? after $SECONDS s"
    pack
}

checks() {
    step 120 "$py" -m pytest -o addopts="" -p no:cacheprovider -q tests/test_augment.py tests/test_models.py -k cuda
    local common=(--dataset "$dataset" --device "$device" --ipc 2 --eval-epochs 30 --num-eval 1 --seed 0)
    for method in dm datadam dc dsa dd; do
        step 120 "$py" -m ddlib distill --method "$method" --iterations 3 "${common[@]}" --no-random-baseline \
            --out "$work/smoke-$method"
    done
    step 120 "$py" -m ddlib experts --dataset "$dataset" --device "$device" --num-experts 2 --epochs 3 --subset 100 \
        --seed 0 --out "$work/experts"
    local trajectory=(--experts "$work/experts" --syn-steps 5 --expert-epochs 1 --max-start-epoch 2)
    step 120 "$py" -m ddlib distill --method mtt --iterations 3 "${common[@]}" --no-random-baseline \
        "${trajectory[@]}" --out "$work/smoke-mtt"
    for method in datm pad; do
        step 120 "$py" -m ddlib distill --method "$method" --iterations 3 "${common[@]}" --no-random-baseline \
            "${trajectory[@]}" --set current_max_start_epoch=1 --out "$work/smoke-$method"
    done
    for method in random herding kcenter; do
        step 120 "$py" -m ddlib select --method "$method" "${common[@]}" --out "$work/smoke-$method"
    done
}

speed() {
    local entries=(dm-mnist-ipc10 dm-mnist-ipc50 datadam-mnist-ipc10 datadam-mnist-ipc50 dc-mnist-ipc1
                   dc-mnist-ipc10-batched dc-mnist-ipc10-loop dc-mnist-ipc50 dsa-mnist-ipc10 dd-mnist-ipc10
                   mtt-mnist-ipc10-n10-b100 mtt-mnist-ipc10-n20-b100 datm-mnist-ipc10 pad-mnist-ipc10)
    local bench=(--device cuda --data-root "$DDLIB_DATA" --experts-cache "$work/bench-experts" --warmup 3 --repeats 10)
    step 240 "$py" -m bench "${bench[@]}" --out "$work/bench" --only "${entries[@]}"
    step 90 "$py" -m bench "${bench[@]}" --out "$work/bench-bf16" --precision bf16 \
        --only dm-mnist-ipc10 datadam-mnist-ipc10 dc-mnist-ipc10-batched mtt-mnist-ipc10-n20-b100
    for ipc in 10 50; do
        step 60 "$py" -m bench.dm_reference --device cuda --ipc "$ipc" --repeats 10 --out "$work/reference"
        step 60 "$py" -m bench.datadam_reference --device cuda --ipc "$ipc" --repeats 10 --out "$work/reference"
        step 90 "$py" -m bench.dc_reference --device cuda --ipc "$ipc" --class-grads auto --repeats 5 \
            --out "$work/reference"
    done
    step 60 "$py" -m bench.dc_reference --device cuda --ipc 1 --class-grads auto --repeats 10 --out "$work/reference"
    step 150 "$py" -m bench "${bench[@]}" --out "$work/bench-compile" --only dm-mnist-ipc10-compile \
        datadam-mnist-ipc10-compile
}

memory() {
    step 150 "$py" -m bench.mtt_reference --device "$device" --out "$work/memory"
}

gm() {
    local common=(--dataset mnist --device "$device" --seed 0 --num-eval 5)
    step 170 "$py" -m ddlib distill --method dc --ipc 1 --init noise --iterations 1000 --protocol dc-aug \
        "${common[@]}" --out "$work/dc_mnist_ipc1_noise_1000it"
    for method in dc dsa; do
        step 130 "$py" -m ddlib distill --method "$method" --ipc 10 --init real --iterations 30 --protocol dc \
            --no-random-baseline "${common[@]}" --out "$work/${method}_mnist_ipc10_real_30it"
    done
}

dm() {
    local common=(--dataset mnist --device "$device" --seed 0 --num-eval 5 --ipc 10 --protocol dc)
    step 380 "$py" -m ddlib distill --method dm --iterations 10000 --batch-real 256 "${common[@]}" \
        --out "$work/dm_mnist_ipc10_10000it"
    step 200 "$py" -m ddlib distill --method datadam --preset paper --no-random-baseline "${common[@]}" \
        --out "$work/datadam_mnist_ipc10_paper"
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    "$py" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
    for part in "$@"; do
        case $part in
            checks|speed|memory|gm|dm) "$part" ;;
            *) echo "unknown part: $part (checks | speed | memory | gm | dm)" ;;
        esac
    done
} 2>&1 | tee "$out/log.txt"
