#!/usr/bin/env bash
# The CUDA checks in one go on a machine with a GPU: teacher (bf16), dump (fp16), dump and student benchmarks.
# Not run yet: no GPU has been lent to this project so far.
# Usage: bash benchmarks/gpu_session.sh [FASHION_MNIST_DIR] [LOG_DIR]
set -euo pipefail
source_dir=${1:-/usr/share/datasets/fashion-mnist}
log=${2:-/tmp/logitcache-gpu}
mkdir -p "$log"
export PYTHONUNBUFFERED=1
lc() { python3 -m logitcache "$@"; }
step() { echo; echo "=== $*"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$log/gpu.txt"
python3 -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__, torch.cuda.get_device_name())'

step "prepare Fashion-MNIST"
lc prepare-data --source "$source_dir"

step "teacher: resnet20, 8 epochs, bf16 autocast, channels-last, 4 loader workers"
lc train-teacher --model resnet20 --epochs 8 --out /tmp/gpu/t20 -S teacher.workers=4 | tee "$log/teacher.txt"

step "dump-teacher: float16 autocast, 4 views, layer2 -> /tmp/gpu/c20"
time lc dump-teacher -S teacher.model=resnet20 -S dump.teacher=/tmp/gpu/t20/teacher.pt --out /tmp/gpu/c20 -S dump.workers=4
lc inspect /tmp/gpu/c20/train.h5 --verify -S teacher.model=resnet20 -S dump.teacher=/tmp/gpu/t20/teacher.pt | tee "$log/inspect.txt"

step "dump throughput against bare inference (all 60,000 samples, 4 views)"
python3 benchmarks/dump_throughput.py --teacher /tmp/gpu/t20/teacher.pt --samples 60000 --views 4 --layer layer2 \
    --workers 4 --repeats 2 | tee "$log/dump_throughput.txt"

step "student epochs: CE, KD, KD+feature, online KD (ResNet-20 teacher)"
python3 benchmarks/student_epoch.py --cache /tmp/gpu/c20/train.h5 --test-cache /tmp/gpu/c20/test.h5 \
    --teacher /tmp/gpu/t20/teacher.pt --model cnn_tiny --epochs 1 --repeats 2 --workers 4 | tee "$log/student_epoch.txt"
