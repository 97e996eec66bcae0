#!/usr/bin/env bash
# Trains the CIFAR-10 model zoo (models/README.md) one model after another, cheapest first, with
# tools/train_cifar_qat.py. Safe to stop and start again, on this machine or a fresh one: a model
# already in models/ is skipped, an unfinished one resumes from models/checkpoints/<name>/ (commit
# that folder to carry a run to the next machine), a finished one's checkpoint is removed and its
# training log kept as models/logs/<name>.log.
#   tools/train_zoo.sh DATA [NAME...]     DATA: CIFAR-10 image folders (train/, test/)
# e.g. mkdir -p data/cifar10-jpeg && for s in train test; do
#        tar xzf ../shared/data/cifar10-$s-jpeg.tar.gz -C data/cifar10-jpeg; done
set -euo pipefail
cd "$(dirname "$0")/.."
data="${1:?usage: tools/train_zoo.sh DATA [NAME...] (DATA: folder with train/ and test/)}"
shift
threads="${CIMSWEEP_TRAIN_THREADS:-2}"
# CIMSWEEP_TRAIN_DEVICE=cuda trains on a GPU (augmentation and random draws stay on the CPU, so a
# checkpoint moves between CPU and GPU machines); CIMSWEEP_PYTHON names a Python whose torch sees
# it, where Debian's /usr/bin/python3 does not (a GPU machine's own PyTorch).
device="${CIMSWEEP_TRAIN_DEVICE:-cpu}"
python="${CIMSWEEP_PYTHON:-/usr/bin/python3}"
# The precision of the models trained from cifar10-resnet32 on: bf16 autocast (fp32 master weights,
# BN and loss) runs 1.6-2.1x faster than fp32 where the CPU has AVX-512 BF16 or AMX
# (bench/results/cpu-train-vs-pytorch-2core-xeon-paused.md). CIMSWEEP_TRAIN_PRECISION=fp32 trains
# them in fp32 on a CPU without it (a run resumes only in the precision it started in).
late_precision="${CIMSWEEP_TRAIN_PRECISION:-bf16}"
case "$late_precision" in
  fp32|bf16) ;;
  *) echo "train_zoo: CIMSWEEP_TRAIN_PRECISION='$late_precision' must be fp32 or bf16" >&2; exit 2 ;;
esac
# name | arguments of tools/train_cifar_qat.py (the first three were trained in fp32)
zoo=(
  "cifar10-resnet20|--depth 20"
  "cifar10-resnet20-k1|--depth 20 --kernel 1"
  "cifar10-resnet20-w8|--depth 20 --width 8"
  "cifar10-resnet32|--depth 32 --precision $late_precision"
  "cifar10-resnet20-k5|--depth 20 --kernel 5 --precision $late_precision"
  "cifar10-resnet44|--depth 44 --precision $late_precision"
  "cifar10-resnet20-w32|--depth 20 --width 32 --precision $late_precision"
  "cifar10-resnet56|--depth 56 --precision $late_precision"
  "cifar10-resnet56-exits|--depth 56 --exits 1,2 --exit-weights 1,0.75,0.5 --precision $late_precision"
  "cifar10-resnet110-exits|--depth 110 --exits 1,2 --exit-weights 1,0.75,0.5 --precision $late_precision"
)
for entry in "${zoo[@]}"; do
  name="${entry%%|*}"
  args="${entry#*|}"
  if [ "$#" -gt 0 ] && [[ " $* " != *" $name "* ]]; then continue; fi
  model="models/$name.safetensors"
  if [ -e "$model" ]; then echo "train_zoo: $model exists, skipped"; continue; fi
  # shellcheck disable=SC2086  # the arguments are words
  "$python" tools/train_cifar_qat.py --data "$data" $args --epochs 40 --lr 0.1 \
    --threads "$threads" --device "$device" --checkpoint-dir "models/checkpoints/$name" \
    --out "$model"
  # The model ships: its training log goes beside the other models' logs, the checkpoint goes.
  mkdir -p models/logs
  mv "models/checkpoints/$name/train.log" "models/logs/$name.log"
  rm -rf "models/checkpoints/$name"
done
