#!/usr/bin/env bash
# The hearing experiment's data: the experiments' shared clips (recipes/experiments/corpus.sh: 1200 training
# clips of 49 voices; eval sets of held-out sentences, evalset-unseen-24 of 12 voices no training clip uses)
# and two sets of targets from the "voice" prompt pool (open requests plus questions about each field a
# description holds, two drawn per clip):
#   targets-voice-qwen  Qwen2.5-Coder-1.5B-Instruct's answers (a stronger teacher; ~65 min on 2 cores in bf16)
#   targets-voice-smol  SmolLM2-135M-Instruct's own answers (self-output for the SmolLM2 speech model)
# Rerunning it does only what is missing: describe and targets resume their finished chunks.
#   bash recipes/experiments/hearing/data.sh      (MODELS=folder of whisper-tiny.en/, SmolLM2-135M-Instruct/,
#                                                  Qwen2.5-Coder-1.5B-Instruct/)
set -euo pipefail
MODELS=${MODELS:-$HOME/.cache/desta-offline-models}
DATA=${DATA:-runs/experiments/data}

DATA=$DATA bash recipes/experiments/corpus.sh
# Both teachers read the same clips and the same drawn prompts; greedy, bf16, cut-off answers end at their
# last sentence. SmolLM2 loops without a repetition penalty; Qwen does not need one.
desta targets --source $DATA/described/dataset --out $DATA/targets-voice-qwen \
    --generation.model $MODELS/Qwen2.5-Coder-1.5B-Instruct --pool voice --prompts-per-clip 2 --sampling.max-new-tokens 96 \
    --trim-cut-off --generation.dtype bfloat16 --generation.batch-size 48
desta targets --source $DATA/described/dataset --out $DATA/targets-voice-smol \
    --generation.model $MODELS/SmolLM2-135M-Instruct --pool voice --prompts-per-clip 2 --sampling.max-new-tokens 96 \
    --sampling.repetition-penalty 1.2 --trim-cut-off --generation.dtype bfloat16 --generation.batch-size 48
