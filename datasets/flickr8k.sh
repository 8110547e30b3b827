#!/usr/bin/env bash
# Flickr8k -> shards, one folder per standard split (one sample per caption; json["captions"] has all five).
#   bash datasets/flickr8k.sh OUT [DATA]        e.g. bash datasets/flickr8k.sh work/shards
# Expected: train 30,000 samples (6,000 images), dev 5,000, test 5,000.
set -euo pipefail
out=${1:?usage: flickr8k.sh OUT [DATA]}
data=${2:-$(dirname "$0")/../../shared/data}/flickr8k
for split in ${SPLITS:-train dev test}; do
    ${PYTHON:-python} -m vlp shards captions --source flickr8k --images "$data/images" --captions "$data/captions.txt" \
        --split "$data/splits/$split.txt" --out "$out/flickr8k/$split" --samples-per-shard 1000 ${VLP_SHARDS_FLAGS:-}
done
