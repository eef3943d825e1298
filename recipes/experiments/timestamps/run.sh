#!/usr/bin/env bash
# Experiment "timestamps": the text LLM reads "[00:00-00:03] transcript (attributes)", but the speech
# model gets only audio vectors and the bare transcript, so it can hardly say how long a clip is.
# model.transcript_format=timestamped gives the speech model the same time span in its transcript slot
# ("[00:00-00:03] transcript"). Compared with the real-length run of the padding experiment: same
# 240 clips, seed and 150 steps; eval on the 48 held-out clips.
#   bash recipes/experiments/timestamps/run.sh
set -euo pipefail
MODELS=${MODELS:-$HOME/.cache/desta-offline-models}
DATA=${DATA:-runs/experiments/data}
OUT=${OUT:-runs/experiments/timestamps}
bash recipes/experiments/padding/run.sh   # the bare-transcript run to compare with (kept if done)

run=$OUT/timestamped
[ -f $run/summary.json ] || desta train recipes/experiments/config.yaml output_dir=$run \
    model.encoder=$MODELS/whisper-tiny.en model.llm=$MODELS/SmolLM2-135M-Instruct \
    data.train=$DATA/targets-self/dataset data.max_clips=240 data.feature_cache=null \
    model.transcript_format=timestamped optim.max_steps=150 log.eval_steps=25 log.save_steps=150
[ -f $run/eval/report.json ] || desta eval $run --eval-set $DATA/evalset --out $run/eval \
    --cache $DATA/eval-cache --max-new-tokens 48 --no-probes
desta compare bare:150=runs/experiments/padding/real_length/eval timestamped:150=$run/eval \
    --runs bare=runs/experiments/padding/real_length --runs timestamped=$run \
    --out recipes/experiments/timestamps/results --x-label step --title "bare vs timestamped transcript slot" \
    --metrics overall:speech,duration:speech,transcription:speech,gender:speech,speaking_speed:speech,instruction_following:speech
echo "timestamps experiment: $((SECONDS / 60)) min"
