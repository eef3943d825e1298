#!/usr/bin/env bash
# The data every experiment shares, made once: the clips, descriptions and eval sets of corpus.sh, then
# self-output targets (SmolLM2-135M-Instruct answering one prompt of the desta25 pool per clip) and label
# targets (answers written from the gold labels by a template). Rerunning it does only what is missing:
# describe and targets resume their finished chunks.
#   bash recipes/experiments/data.sh              (MODELS=folder of whisper-tiny.en/ and SmolLM2-135M-Instruct/)
set -euo pipefail
MODELS=${MODELS:-$HOME/.cache/desta-offline-models}
DATA=${DATA:-runs/experiments/data}

DATA=$DATA bash recipes/experiments/corpus.sh
# ~1 h on 2 cores: 1200 answers of up to 96 tokens, cut-off answers trimmed to their last sentence
desta targets --source $DATA/described/dataset --out $DATA/targets-self --generation.model $MODELS/SmolLM2-135M-Instruct \
    --pool desta25 --sampling.max-new-tokens 96 --sampling.repetition-penalty 1.2 --trim-cut-off
desta targets --source $DATA/described/dataset --out $DATA/targets-labels --kind labels --pool desta25
