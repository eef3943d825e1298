#!/usr/bin/env bash
# Compare strategies against forgetting on SmolLM2-135M-Instruct, CPU (33 minutes on one core).
#   bash recipes/forgetting/run.sh MODELS [OUT]
set -euo pipefail
MODELS=${1:?give the folder holding SmolLM2-135M-Instruct}
OUT=${2:-runs/forgetting}
desta posttrain recipes/forgetting/config.yaml model=$MODELS/SmolLM2-135M-Instruct output_dir=$OUT
