#!/usr/bin/env bash
# The DeSTA loop on real small models: Whisper tiny.en + SmolLM2-135M-Instruct, 2-core CPU.
# MODELS holds whisper-tiny.en/ and SmolLM2-135M-Instruct/ (tools/fetch_offline_models.sh, or `hf download`).
#   bash recipes/smol/run.sh MODELS [OUT]
set -euo pipefail
MODELS=${1:?give the folder holding whisper-tiny.en and SmolLM2-135M-Instruct}
OUT=${2:-runs/smol}
WHISPER=$MODELS/whisper-tiny.en LLM=$MODELS/SmolLM2-135M-Instruct

# 1. 400 training clips (~20 min of speech) and 12 held-out clips, ~3 s.
desta synth --out $OUT/corpus --num-clips 400 --seed 11 --num-proc 2
desta synth --out $OUT/corpus-eval --num-clips 12 --seed 12

# 2. Descriptions, ~10 s.
desta describe --source $OUT/corpus/manifest.jsonl --mapping synthetic --out $OUT/described
desta describe --source $OUT/corpus-eval/manifest.jsonl --mapping synthetic --out $OUT/described-eval

# 3. SmolLM2 writes the targets; looping or cut-off answers go to rejects (~25 min on 2 cores).
desta targets --source $OUT/described/dataset --out $OUT/targets --generation.model $LLM \
    --sampling.max-new-tokens 128 --sampling.repetition-penalty 1.2 --generation.batch-size 16

# 4. Train the connector on cached Whisper features, 200 steps of 8 (~15 min).
desta train recipes/smol/config.yaml output_dir=$OUT/train model.encoder=$WHISPER model.llm=$LLM \
    data.train=$OUT/targets/dataset data.feature_cache=$OUT/features optim.max_steps=200

# 5. Unseen instructions, speech model vs text reference (~5 min).
desta eval-set --source $OUT/described-eval/dataset --out $OUT/evalset
desta eval $OUT/train --eval-set $OUT/evalset --out $OUT/eval

# 6. Export with Hub ids for the bases, and ask it something.
desta export $OUT/train $OUT/export --encoder-id openai/whisper-tiny.en \
    --llm-id HuggingFaceTB/SmolLM2-135M-Instruct --license apache-2.0 --report $OUT/eval/report.json
desta chat $OUT/export --audio $OUT/corpus-eval/audio/synth-12-000000.wav "What can you hear from the audio?"
