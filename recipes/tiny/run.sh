#!/usr/bin/env bash
# The DeSTA loop stage by stage on tiny random models: every command a user types, nothing hidden.
# 2-core CPU, no GPU, no network: about a minute in all. The models are random, so the answers are
# noise; what it shows is that each stage's output feeds the next.
#   bash recipes/tiny/run.sh [OUT]
set -euo pipefail
OUT=${1:-runs/tiny}

# 0. Tiny random Whisper (4 layers, 64 wide) and LLM (2 layers, 64 wide) as ordinary model folders.
desta tiny-models $OUT/bases
WHISPER=$OUT/bases/tiny-whisper LLM=$OUT/bases/tiny-llm

# 1. Synthetic speech with known labels: 200 clips (~3 min of audio) in ~2 s.
desta synth --out $OUT/corpus --num-clips 200 --num-proc 2
desta synth --out $OUT/corpus-eval --num-clips 8 --seed 1

# 2. Describe: signal attributes + metadata labels -> DeSTA2.5 descriptions, ~3 s.
desta describe --source $OUT/corpus/manifest.jsonl --mapping synthetic --out $OUT/described
desta describe --source $OUT/corpus-eval/manifest.jsonl --mapping synthetic --out $OUT/described-eval

# 3. Targets: the LLM answers "What can you hear from the audio?" from each description, ~5 s.
#    A random LLM never stops by itself, so its cut-off answers are kept (flagged) here.
desta targets --source $OUT/described/dataset --out $OUT/targets --generation.model $LLM --sampling.max-new-tokens 24 --keep-flagged

# 4. Train the Q-Former connector for 60 steps (~10 s).
desta train recipes/tiny/config.yaml output_dir=$OUT/train model.encoder=$WHISPER model.llm=$LLM \
    data.train=$OUT/targets/dataset

# 5. Evaluate on unseen instructions against the LLM reading the gold descriptions (~20 s).
desta eval-set --source $OUT/described-eval/dataset --out $OUT/evalset
desta eval $OUT/train --eval-set $OUT/evalset --out $OUT/eval --max-new-tokens 16 --probe-max-new-tokens 16

# 6. Export a Hub-ready folder (dry run of the upload).
desta export $OUT/train $OUT/export --report $OUT/eval/report.json --push me/desta-tiny --dry-run
