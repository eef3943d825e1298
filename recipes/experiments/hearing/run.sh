#!/usr/bin/env bash
# Experiment "hearing": does the speech model hear what its LLM reads when its targets talk about the voice?
# All runs train on the same 1200 clips with two prompts each from the "voice" pool (open requests plus
# questions about each description field; data.sh) and are evaluated on the same 240 items of 24 clips spoken by
# voices no training clip uses (EVAL_SET), against chance, the speech model's own LLM reading the description
# (text-ASR, text-gold), the base LLM and the targets' teacher:
#   qwen-lora       SmolLM2-135M speech model, Qwen2.5-Coder-1.5B-Instruct's answers (another teacher), + LoRA r8
#   self-lora       SmolLM2-135M speech model, its own answers (self-output), + LoRA r8
#   qwen-connector  Qwen's answers, the connector alone (the LLM untouched, so it cannot forget in text)
#   qwen-onpolicy   qwen-lora continued by on-policy distillation (optim.loss=on_policy): the speech model samples
#                   its own answers and is pulled (reverse KL) toward SmolLM2 reading the description, on
#                   ONPOLICY_CLIPS clips
#   qwen-backbone   Qwen2.5-Coder-1.5B-Instruct as the speech model's own frozen LLM, trained on its own answers
#                   (self-output end to end, the connector alone): the swap-backbone path, on QWEN_CLIPS clips
# Each run: EPOCHS epochs (default 4: about 1200 steps; the sanity ladder measured that a field named in one
# answer of three takes 300 steps of batches of 8 to break through, so the voice pool's one in nine would need
# about 900; named in one answer of eight, gender was not heard by 800: a lower bound), batches of 8, bf16
# autocast (the CPU has bf16 instructions), the frozen encoder's features cached once for all runs. The
# results in results-before-ladder/ were made with one epoch, the Q-Former and a cosine rate:
# EPOCHS=1 SETUP="model.connector=qformer optim.schedule=cosine" reproduces them. Resumable: finished trainings
# and evals are kept, answers come from the eval cache. Then `desta probe` on both target sets (what the
# features carry, what each teacher's answers name) and the comparison.
#   bash recipes/experiments/hearing/run.sh
#   RUNS="qwen-lora self-lora" bash recipes/experiments/hearing/run.sh      (a subset)
set -euo pipefail
MODELS=${MODELS:-$HOME/.cache/desta-offline-models}
DATA=${DATA:-runs/experiments/data}
OUT=${OUT:-runs/experiments/hearing}
QWEN_CLIPS=${QWEN_CLIPS:-600}
ONPOLICY_CLIPS=${ONPOLICY_CLIPS:-400}
EPOCHS=${EPOCHS:-4}
EVAL_SET=${EVAL_SET:-evalset-unseen-24}
read -r -a SETUP <<< "${SETUP:-}"   # extra overrides for every run, e.g. model.connector=qformer
SMOL=$MODELS/SmolLM2-135M-Instruct QWEN=$MODELS/Qwen2.5-Coder-1.5B-Instruct WHISPER=$MODELS/whisper-tiny.en
RESULTS=recipes/experiments/hearing/results
bash recipes/experiments/hearing/data.sh
mkdir -p $RESULTS

for run in ${RUNS:-qwen-lora self-lora qwen-connector qwen-backbone qwen-onpolicy}; do
  # evals in bf16 (the CPU has bf16 instructions: Qwen's references about twice as fast as in float32)
  targets=$DATA/targets-voice-qwen/dataset llm=$SMOL extra=() eval_extra=(--dtype bfloat16)
  case $run in
    self-lora) targets=$DATA/targets-voice-smol/dataset ;;
    qwen-backbone) llm=$QWEN
                   extra+=(data.max_clips=$QWEN_CLIPS model.dtype=bfloat16 optim.batch_size=4
                           data.feature_cache=$DATA/features-qwen log.save_steps=100) ;;
    qwen-onpolicy) extra+=(model.init_from=$OUT/qwen-lora "model.lora={r: 8, lora_alpha: 16}" optim.loss=on_policy
                           optim.on_policy_max_new_tokens=48 optim.lr=1e-4 optim.warmup_steps=10
                           data.max_clips=$ONPOLICY_CLIPS) ;;
  esac
  [[ $run == *-lora ]] && extra+=("model.lora={r: 8, lora_alpha: 16}")
  # the targets' teacher reads the descriptions too (what Qwen's answers could carry); the backbone run's own LLM is it
  [[ $run == qwen-* && $run != qwen-backbone ]] && eval_extra+=(--teacher-model $QWEN)
  [ -f $OUT/$run/summary.json ] || desta train recipes/experiments/config.yaml output_dir=$OUT/$run \
      model.encoder=$WHISPER model.llm=$llm data.train=$targets optim.epochs=$EPOCHS optim.precision=bf16 \
      log.eval_steps=100 log.save_steps=200 "${SETUP[@]}" "${extra[@]}"
  [ -f $OUT/$run/eval/report.json ] || desta eval $OUT/$run --eval-set $DATA/$EVAL_SET --out $OUT/$run/eval \
      --cache $DATA/eval-cache --max-new-tokens 48 --probe-max-new-tokens 48 "${eval_extra[@]}"
  cp $OUT/$run/eval/report.md $RESULTS/report-$run.md
done

# what Whisper tiny.en's features carry, and what each teacher's answers name (both on the training clips)
for teacher in qwen smol; do
  [ -f $OUT/probe-$teacher/probe.json ] || desta probe $DATA/targets-voice-$teacher/dataset --encoder $WHISPER \
      --out $OUT/probe-$teacher
  cp $OUT/probe-$teacher/probe.md $RESULTS/probe-$teacher.md
done

# how often each teacher's answers state the clip's gold value (all answers, and those asked about the field)
sets=(); for teacher in smol qwen; do [ -d $DATA/targets-voice-$teacher/dataset ] && sets+=("$teacher=$DATA/targets-voice-$teacher/dataset"); done
python recipes/experiments/hearing/naming.py "${sets[@]}" --out $RESULTS

# what each run's connector carries to its LLM, checkpoint by checkpoint: label likelihoods, not its answers
trained=(); for run in qwen-lora self-lora qwen-connector qwen-backbone qwen-onpolicy; do
  [ -f $OUT/$run/summary.json ] && trained+=("$run=$OUT/$run"); done
[ ${#trained[@]} -gt 0 ] && python recipes/experiments/hearing/labels.py "${trained[@]}" --out $RESULTS --every 200 \
    --clips $DATA/described-eval/dataset --train $DATA/described/dataset

reports=(); runs=()
for run in qwen-lora self-lora qwen-connector qwen-backbone qwen-onpolicy; do
  [ -f $OUT/$run/eval/report.json ] || continue
  reports+=("$run:$EPOCHS=$OUT/$run/eval"); runs+=("$run=$OUT/$run")
done
# each field from the audio and read from the description (text = the run's own base LLM, gold transcript); the
# ratios to it are the goal's (overall, and format following)
metrics=overall:speech,overall:text,overall:text_asr
for field in gender accent speaking_speed pitch volume duration instruction_following transcription; do
  metrics=$metrics,$field:speech,$field:text
done
metrics=$metrics,overall:agreement:speech,overall:forgetting:speech,instruction_following:forgetting:speech
metrics=$metrics,probes:format_following,probes:heldout_loglik
paired=()
[ -f $OUT/self-lora/eval/report.json ] && paired=(--paired-with self-lora)
desta compare "${reports[@]}" --out $RESULTS --x-label epoch "${paired[@]}" --runs "$(IFS=,; echo "${runs[*]}")" \
    --title "voice-pool targets on the ladder's settings (projector, constant rate, $EPOCHS epochs), 240 items of 12 unseen voices" \
    --metrics $metrics
python recipes/experiments/tables.py
# what each LoRA costs the LLM in text (its LLM with the LoRA merged, on desta posttrain's retention sets)
lora=(); for run in qwen-lora self-lora qwen-onpolicy; do [ -f $OUT/$run/summary.json ] && lora+=("$run=$OUT/$run"); done
[ ${#lora[@]} -gt 0 ] && python recipes/experiments/hearing/retention.py "${lora[@]}" --out $RESULTS \
    --work $OUT/retention
echo "hearing experiment: $((SECONDS / 60)) min"
