#!/usr/bin/env bash
# The data every experiment shares, made once: 1200 training clips and 48 held-out clips of the
# synthetic corpus, described; self-output targets (SmolLM2-135M-Instruct answering one prompt of the
# desta25 pool per clip) and label targets (the same clips and prompts, answers written from the
# gold labels by a template); the eval sets (48 clips, and their first 24 for per-epoch evals).
# Rerunning it does only what is missing: describe and targets resume their finished chunks.
#   bash recipes/experiments/data.sh              (MODELS=folder of whisper-tiny.en/ and SmolLM2-135M-Instruct/)
set -euo pipefail
MODELS=${MODELS:-$HOME/.cache/desta-offline-models}
DATA=${DATA:-runs/experiments/data}

desta synth --out $DATA/corpus --num-clips 1200 --num-proc 2                     # ~1 min
desta synth --out $DATA/corpus-eval --num-clips 48 --seed 1
desta describe --source $DATA/corpus/manifest.jsonl --mapping synthetic --out $DATA/described
desta describe --source $DATA/corpus-eval/manifest.jsonl --mapping synthetic --out $DATA/described-eval
# ~1 h on 2 cores: 1200 answers of up to 96 tokens, cut-off answers trimmed to their last sentence
desta targets --source $DATA/described/dataset --out $DATA/targets-self --model $MODELS/SmolLM2-135M-Instruct \
    --pool desta25 --max-new-tokens 96 --repetition-penalty 1.2 --trim-cut-off
desta targets --source $DATA/described/dataset --out $DATA/targets-labels --kind labels --pool desta25
[ -d $DATA/evalset ] || desta eval-set --source $DATA/described-eval/dataset --out $DATA/evalset
[ -d $DATA/evalset-24 ] || desta eval-set --source $DATA/described-eval/dataset --out $DATA/evalset-24 --max-clips 24
