#!/usr/bin/env bash
# CIFAR-10 image folders -> labelled shards (cls = class index in sorted folder order, txt = class name).
#   bash datasets/cifar10.sh OUT [DATA]
# Expected: train 50,000 samples, test 10,000 (1,000 per class).
set -euo pipefail
out=${1:?usage: cifar10.sh OUT [DATA]}
data=${2:-$(dirname "$0")/../../shared/data}/cifar10
for split in ${SPLITS:-train test}; do
    ${PYTHON:-python} -m vlp shards folder --source cifar10 --root "$data/$split" --out "$out/cifar10/$split" \
        --samples-per-shard 2000 ${VLP_SHARDS_FLAGS:-}
done
