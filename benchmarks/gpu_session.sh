#!/usr/bin/env bash
# Issue 13's GPU figures in one run: what a session lent a GPU executes once.
#
#   bash benchmarks/gpu_session.sh OUT_DIR [--quick] [--no-data]
#
# Writes into OUT_DIR (at most 8 files, so a remote run can bring them all back):
#   host.txt                 GPU, driver, torch/CUDA/cuDNN versions, CPU model
#   batch_construction.json  every task's make_batch on the GPU: ms/volume, kernels, syncs
#   eager.json               train_throughput: every 3D pretraining task at its paper size
#                            and every 3D backbone's fine-tuning step (bf16, fused Adam, the
#                            loss read once per step as the loop's FiniteWatch does not)
#   compiled.json            the full U-Net's fine-tuning step at 128^3, batch 4 and 8,
#                            torch.compile, no host sync per step (the 100 volumes/s target)
#   data.json                --data on a real-layout MSD folder of 128^3-class volumes
#                            written here: the cases held on the GPU (data_placement=device)
#                            and the DataLoader (loader), each beside the training rate
#   log.txt                  every step's stderr and exit code
#
# The device image has torch but not every dependency: carry these wheels (from the repo
# root here; about 61 MB, SimpleITK for torchio is 53 MB of it; --no-data needs only the
# first four and monai/dynamic-network-architectures for their backbones' rows):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl pydantic==2.14.4 pydantic-core==2.50.5 \
#     annotated-types==0.8.0 typing-inspection==0.4.5 monai==1.6.1 \
#     dynamic-network-architectures==0.4.4 nibabel==5.4.2 torchio==1.2.1 simpleitk==2.5.7
# and run (carry: [".whl"], timeout_s 600; it takes about 8 minutes on an H200):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/benchmark:$PWD/plugins \
#     && bash benchmarks/gpu_session.sh $OUT
set -u
out=${1:?usage: gpu_session.sh OUT_DIR [--quick] [--no-data]}
shift
quick=0 data=1
for arg in "$@"; do
  case $arg in
    --quick) quick=1 ;;  # a smoke run: tiny sizes, one step (for checking the script itself)
    --no-data) data=0 ;;
    *) echo "unknown option $arg" >&2; exit 2 ;;
  esac
done
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
device=${DEVICE:-cuda}
log="$out/log.txt"
: > "$log"

step() {  # step NAME LIMIT_S command...: stdout to NAME.json, stderr and exit code to the log
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*" >> "$log"
  local start=$SECONDS
  timeout "$limit" "$@" > "$out/$name.json" 2>> "$log"
  echo "== $name: exit $? after $((SECONDS - start)) s" >> "$log"
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  $py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
  grep -m1 "model name" /proc/cpuinfo
  echo "cpus $(nproc)"
} > "$out/host.txt" 2>> "$log"

if [ "$quick" = 1 ]; then
  size=(--size 32) steps=(--steps 1 --warmup 1) small=(--preset quick)
  cases=6 side=40
else
  size=() steps=(--steps 10 --warmup 3) small=()
  cases=24 side=144
fi

step batch_construction 120 $py benchmarks/batch_construction.py --device "$device" \
  --json --detail ${size[@]+"${size[@]}"} --repeats "$([ $quick = 1 ] && echo 1 || echo 10)"
step eager 300 $py benchmarks/train_throughput.py --device "$device" --json --quiet \
  --loss-sync none --time-limit-s 240 "${steps[@]}" ${size[@]+"${size[@]}"} \
  ${small[@]+"${small[@]}"}
# The 100 volumes/s target: compile once per row (about 25 s each), batch 4 and 8.
{
  for batch in 4 8; do
    $py benchmarks/train_throughput.py --device "$device" --json --quiet --tasks none \
      --backbones unet3d --batch-size "$batch" --loss-sync none --compile "${steps[@]}" \
      ${size[@]+"${size[@]}"} ${small[@]+"${small[@]}"} || echo "{\"error\": \"batch $batch: exit $?\"}"
  done
} > "$out/compiled.json" 2>> "$log"
echo "== compiled: done" >> "$log"

if [ "$data" = 1 ]; then
  root=$(mktemp -d)/msd
  # A real-layout MSD task folder (dataset.json, imagesTr/labelsTr NIfTI, macOS ._ files):
  # the tests' writer, at the size of a cropped abdominal CT.
  $py - "$root" "$cases" "$side" >> "$log" 2>&1 <<'EOF'
import sys
from pathlib import Path

sys.path.insert(0, "tests")
from datasets_fixtures import write_msd

root, cases, side = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
write_msd(root, ids=tuple(range(1, cases + 1)), test_ids=(), shape=(side, side, side * 3 // 4))
print("wrote", cases, "cases of", side, "to", root)
EOF
  dsize=$([ $quick = 1 ] && echo 32 || echo 128)
  {
    for placement in device loader; do
      $py benchmarks/train_throughput.py --device "$device" --json --quiet \
        --data msd --tasks rotation3d,genesis3d --backbones unet3d "${steps[@]}" \
        ${small[@]+"${small[@]}"} --set dataset.root="$root" dataset.size="$dsize" \
        pretrain.data_placement=$placement finetune.data_placement=$placement \
        pretrain.num_workers=4 finetune.num_workers=4 \
        || echo "{\"error\": \"$placement: exit $?\"}"
    done
  } > "$out/data.json" 2>> "$log"
  echo "== data: done" >> "$log"
fi
echo "== all done after $SECONDS s" >> "$log"
