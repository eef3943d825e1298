#!/usr/bin/env bash
# Experiment "targets": does training on the LLM's own answers keep its abilities where label
# targets lose them? The same 160 clips and prompts, three kinds of target:
#   self_output  the text LLM's own answers to the description (DeSTA2)
#   labels       an answer written from the gold labels and transcript by a template (no LLM)
#   kl           distillation: the KL divergence to the text LLM's next-token distributions when it
#                reads the description, on the self-output answers (as Ultravox and DiVA train)
# self_output and labels each with the connector only and with connector + LoRA (r 8) on the LLM,
# kl with the connector only; 3 epochs, evaluated after
# every epoch on 24 held-out clips: attribute questions, instruction following, agreement with the
# text reference, and the text-only retention probes. Resumable: training continues from its last
# checkpoint, finished evals are kept, answers already computed come from the eval cache.
#   bash recipes/experiments/targets/run.sh
#   ADAPTERS=connector bash recipes/experiments/targets/run.sh      (the connector-only runs, ~75 min)
set -euo pipefail
MODELS=${MODELS:-$HOME/.cache/desta-offline-models}
DATA=${DATA:-runs/experiments/data}
OUT=${OUT:-runs/experiments/targets}
bash recipes/experiments/data.sh

for kind in ${KINDS:-self_output labels kl}; do
  for adapter in ${ADAPTERS:-connector lora}; do
    # distillation is run with the connector only: the LoRA comparison is made on the two data kinds
    [ $kind = kl ] && [ $adapter = lora ] && continue
    run=$OUT/$kind-$adapter
    targets=$DATA/targets-self/dataset
    extra=()
    [ $kind = labels ] && targets=$DATA/targets-labels/dataset
    [ $kind = kl ] && extra+=(optim.loss=kl)
    [ $adapter = lora ] && extra+=("model.lora={r: 8, lora_alpha: 16}")
    [ -f $run/summary.json ] || desta train recipes/experiments/config.yaml output_dir=$run \
        model.encoder=$MODELS/whisper-tiny.en model.llm=$MODELS/SmolLM2-135M-Instruct data.train=$targets \
        data.max_clips=160 optim.epochs=3 log.save_strategy=epoch "${extra[@]}"
    epoch=0
    for checkpoint in $(ls -d $run/checkpoint-* | sort -V); do
      epoch=$((epoch + 1))
      [ -f $run/eval-$epoch/report.json ] || desta eval $checkpoint --eval-set $DATA/evalset-24 \
          --out $run/eval-$epoch --cache $DATA/eval-cache --max-new-tokens 48 --probe-max-new-tokens 48
    done
  done
done
# the comparison holds every finished run, also those of earlier invocations (e.g. ADAPTERS=lora after
# ADAPTERS=connector), and their loss curves and speed
reports=(); runs=()
for kind in self_output labels kl; do
  for adapter in connector lora; do
    run=$OUT/$kind-$adapter
    [ -f $run/summary.json ] || continue
    runs+=("$kind-$adapter=$run")
    for epoch in 1 2 3; do
      if [ -f $run/eval-$epoch/report.json ]; then reports+=("$kind-$adapter:$epoch=$run/eval-$epoch"); fi
    done
  done
done
paired=()
if [ -f $OUT/self_output-connector/summary.json ]; then paired=(--paired-with self_output-connector); fi
desta compare "${reports[@]}" --out recipes/experiments/targets/results --x-label epoch "${paired[@]}" \
    --runs "$(IFS=,; echo "${runs[*]}")" \
    --title "self-output vs label targets vs distillation (SmolLM2-135M, 160 clips)" \
    --metrics overall:speech,instruction_following:speech,overall:agreement:speech,overall:forgetting_asr:speech,gender:speech,transcription:speech,probes:format_following,probes:heldout_loglik
echo "targets experiment: $((SECONDS / 60)) min"
