#!/usr/bin/env bash
# The whole forgetting comparison on SmolLM2-135M-Instruct: 20 runs (11 strategies, 3 seeds for sft,
# lora and replay, replay at 1, 5 and 10 %), in bf16: the base and 20 runs took 119.4 min alone on a
# 2-core CPU (4-10 min a run), about 2 h with set-up; the time taken is written into comparison.md.
# Resumable: run the same command again after a stop and the finished runs are kept; changed settings
# are refused (add overwrite=true to redo those runs).
#   bash recipes/forgetting/run.sh MODELS [OUT] [key=value ...]
set -euo pipefail
MODELS=${1:?give the folder holding SmolLM2-135M-Instruct}
OUT=${2:-runs/forgetting}
desta posttrain recipes/forgetting/config.yaml model="$MODELS/SmolLM2-135M-Instruct" output_dir="$OUT" "${@:3}"
