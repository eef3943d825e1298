#!/usr/bin/env bash
# Which fields Whisper tiny.en's features carry, on the experiments' training voices and on the 12 voices held
# out of training entirely (recipes/experiments/data.sh first). Writes results/probe.{md,json,png}.
#   bash recipes/experiments/probe-voices/run.sh      (MODELS=folder of whisper-tiny.en/)
set -euo pipefail
MODELS=${MODELS:-$HOME/.cache/desta-offline-models}
DATA=${DATA:-runs/experiments/data}
desta probe $DATA/described/dataset --encoder $MODELS/whisper-tiny.en --heldout $DATA/described-eval/dataset \
    --out runs/experiments/probe-voices
cp runs/experiments/probe-voices/probe.{md,json,png} recipes/experiments/probe-voices/results/
