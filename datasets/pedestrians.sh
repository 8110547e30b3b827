#!/usr/bin/env bash
# Pedestrian re-ID folders -> identity shards (json identity = person index in sorted order, person = folder name).
#   bash datasets/pedestrians.sh OUT [DATA]
# Expected: train 992 samples (62 identities); val query 28, gallery 181.
set -euo pipefail
out=${1:?usage: pedestrians.sh OUT [DATA]}
data=${2:-$(dirname "$0")/../../shared/data}/pedestrians
${PYTHON:-python} -m vlp shards identities --source pedestrians --root "$data/train" --out "$out/pedestrians/train" ${VLP_SHARDS_FLAGS:-}
for part in query gallery; do
    ${PYTHON:-python} -m vlp shards identities --source pedestrians-$part --root "$data/val/$part" \
        --out "$out/pedestrians/$part" ${VLP_SHARDS_FLAGS:-}
done
