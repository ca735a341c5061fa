#!/usr/bin/env bash
# Multi-process meta-training with `accelerate launch`: one code path for CPU, one GPU and many.
# Usage: examples/multiprocess_meta_train.sh DATA OUT [extra `improver meta-train` options...]
#   e.g. examples/multiprocess_meta_train.sh runs/reach-v3/train runs/reach-v3/run2 --steps 1500 --distill-weight 0
# Each process takes batch_size / 2 examples per step and gradients are averaged, so two
# processes take the same steps as one (tests/test_meta_train.py checks it). Set the process
# count in examples/accelerate_cpu.yaml or override it: NUM_PROCESSES=4 examples/...
set -euo pipefail
data=${1:?usage: $0 DATA OUT [options]}
out=${2:?usage: $0 DATA OUT [options]}
shift 2
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python}
# Two processes on two cores: one thread each, or they fight over the cores.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$python" -m accelerate.commands.launch --config_file "$here/accelerate_cpu.yaml" \
  --num_processes "${NUM_PROCESSES:-2}" -m improver.cli meta-train --data "$data" --out "$out" "$@"
