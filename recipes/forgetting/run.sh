#!/usr/bin/env bash
# Compare strategies against forgetting on SmolLM2-135M-Instruct, 2-core CPU (about 25 minutes).
#   bash recipes/forgetting/run.sh MODELS [OUT]
set -euo pipefail
MODELS=${1:?give the folder holding SmolLM2-135M-Instruct}
OUT=${2:-runs/forgetting}
desta posttrain recipes/forgetting/config.yaml model=$MODELS/SmolLM2-135M-Instruct output_dir=$OUT
