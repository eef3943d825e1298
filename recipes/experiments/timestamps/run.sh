#!/usr/bin/env bash
# Experiment "timestamps": the text LLM reads "[00:00-00:03] transcript (attributes)", but the speech
# model gets only audio vectors and the bare transcript, so it can hardly say how long a clip is.
# model.transcript_format=timestamped gives the speech model the same time span in its transcript slot
# ("[00:00-00:03] transcript"). Compared with the self-output, connector-only run of the targets
# experiment (bare transcript): the same 160 clips, seed, 3 epochs and feature cache; both evaluated
# after epoch 3 on the same 24 held-out clips.
#   bash recipes/experiments/timestamps/run.sh
set -euo pipefail
MODELS=${MODELS:-$HOME/.cache/desta-offline-models}
DATA=${DATA:-runs/experiments/data}
OUT=${OUT:-runs/experiments/timestamps}
bare=runs/experiments/targets/self_output-connector
[ -f $bare/eval-3/report.json ] || { echo "run recipes/experiments/targets/run.sh first (the bare-transcript run)"; exit 1; }

run=$OUT/timestamped
[ -f $run/summary.json ] || desta train recipes/experiments/config.yaml output_dir=$run \
    model.encoder=$MODELS/whisper-tiny.en model.llm=$MODELS/SmolLM2-135M-Instruct \
    data.train=$DATA/targets-self/dataset data.max_clips=160 optim.epochs=3 log.save_strategy=epoch \
    model.transcript_format=timestamped
[ -f $run/eval/report.json ] || desta eval $run --eval-set $DATA/evalset-24 --out $run/eval \
    --cache $DATA/eval-cache --max-new-tokens 48 --no-probes
desta compare bare:3=$bare/eval-3 timestamped:3=$run/eval --runs bare=$bare --runs timestamped=$run \
    --paired-with bare --out recipes/experiments/timestamps/results --x-label epoch --title "bare vs timestamped transcript slot" \
    --metrics overall:speech,duration:speech,transcription:speech,gender:speech,speaking_speed:speech,instruction_following:speech
echo "timestamps experiment: $((SECONDS / 60)) min"
