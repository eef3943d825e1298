#!/usr/bin/env bash
# desta's first checks on a lent GPU machine (docs/gpu.md), about 15 minutes on 2 GPUs of the H100/H200 class:
#   1. bench/gpu.py at DeSTA2.5 shapes (random weights): the loss checks, MFU at batch 12 and at the largest batch,
#      packing, and generation per setting and backend at Llama-3.1-8B shapes
#   2. a 2-GPU DDP train with LoRA and the feature cache (built on the GPUs, the clips split between the processes)
#   3. the targets backends side by side on real answers (transformers, vLLM where installed), and
#   4. continuous against token-budget batching on those answers
# MODELS holds whisper-tiny.en/ and SmolLM2-135M-Instruct/ (tools/fetch_offline_models.sh, or `hf download`).
#   pip install -e . && MODELS=DIR bash bench/first_checks.sh [OUT]
set -euo pipefail
MODELS=${MODELS:?set MODELS to the folder holding whisper-tiny.en and SmolLM2-135M-Instruct}
OUT=${1:-runs/first-checks}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpus.txt"

# 1. About 5 minutes on one GPU.
python bench/gpu.py --shapes desta25 --time-budget 300 | tee "$OUT/gpu.txt"

# 2. 200 synthetic clips with label targets (no LLM needed), then 2 processes: DDP, LoRA, the feature cache.
desta synth --out "$OUT/corpus" --num-clips 200 --seed 3
desta describe --source "$OUT/corpus/manifest.jsonl" --mapping synthetic --out "$OUT/described"
desta targets --source "$OUT/described/dataset" --out "$OUT/labels" --kind labels
accelerate launch --config_file recipes/accelerate/ddp.yaml --num_processes 2 -m desta.cli train \
    recipes/smol/config.yaml output_dir="$OUT/train" model.encoder="$MODELS/whisper-tiny.en" \
    model.llm="$MODELS/SmolLM2-135M-Instruct" data.train="$OUT/labels/dataset" data.feature_cache="$OUT/features" \
    "model.lora={r: 8}" optim.max_steps=60 optim.batch_size=12 log.eval_steps=30 log.save_steps=30 \
    2>&1 | tee "$OUT/train.txt"

# 3 and 4. SmolLM2's own answers to 1024 descriptions: token-budget batches, continuous batching, vLLM.
python bench/targets.py --models "$MODELS" --prompts 1024 --max-new-tokens 256 \
    --settings tokens:memory,continuous,vllm | tee "$OUT/targets.txt"

echo "figures: $OUT/gpu.txt (last line JSON), $OUT/train/summary.json, $OUT/targets.txt (last line JSON)"
