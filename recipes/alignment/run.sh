#!/usr/bin/env bash
# The alignment comparison on SmolLM2-135M-Instruct: every strategy of the second lecture and after
# (response tuning, the rule-based adapter, Magpie replay with and without a KL to the base model, on-policy
# distillation from the base model, self-alignment, Known vs Unknown items) beside sft on the same items, then
# the token-shift reports of the stand-in pair (the model before and after sft, and after self_align).
# About 1 h 25 min alone on a 2-core CPU, estimated (1 h 15 min to 1 h 45 min; see README.md, Time).
# Resumable: run the same command again after a stop and the finished runs and reports are kept; changed
# settings are refused (add overwrite=true to redo those runs).
#   bash recipes/alignment/run.sh MODELS [OUT] [key=value ...]
set -euo pipefail
MODELS=${1:?give the folder holding SmolLM2-135M-Instruct}
OUT=${2:-runs/alignment}
BASE="$MODELS/SmolLM2-135M-Instruct"
desta posttrain recipes/alignment/config.yaml model="$BASE" output_dir="$OUT" "${@:3}"
# The package index ships no base model with its aligned version of one family (README.md): the stand-in pair
# is the instruct model before and after desta's training, on 48 general requests it was not trained on.
for strategy in sft self_align; do
  desta token-shift "$BASE" "$OUT/$strategy/seed-0/model" out="$OUT/token-shift/$strategy" count=48 \
    max_new_tokens=64 batch_size=48  # float32: the ranks exact (a model against itself shifts nothing)
done
