#!/usr/bin/env bash
# The clips every experiment shares, made once (recipes/experiments/data.sh adds the targets):
#   - a training corpus of 1200 clips spoken by 49 voices of four engines (espeak-ng, MBROLA, flite, piper),
#   - an eval corpus of 96 clips: half spoken by 12 voices no training clip uses (held out entirely), half by
#     training voices, every sentence one no training clip says,
#   - real speech: Debian's Asterisk prompts (2670 described, five languages, four professional voices),
# each described, and the eval sets (the 96 synthetic clips, their first 24, the first 24 of the held-out voices,
# and 100 real-speech clips). Needs tools/install_voices.sh (as root). MBROLA voices are for non-commercial,
# non-military use only (their licence): so are this corpus and what is trained on it. Rerunning it does only
# what is missing: describe resumes its finished chunks.
#   bash recipes/experiments/corpus.sh
set -euo pipefail
DATA=${DATA:-runs/experiments/data}

# 61 voices: espeak-ng's six accents with three female and three male variants, the 20 MBROLA voices that read
# English, flite's four and piper's one. Held out: one espeak-ng variant per accent, five MBROLA voices and
# flite's rms; each held-out voice's gender and accent are also spoken by training voices, so every question
# about an unseen voice has an answer the model was taught.
ESPEAK=$(for a in en-us en-gb-x-rp en-gb-scotland en-029 en-gb-x-gbclan en-gb-x-gbcwmd; do
  for v in f1 f2 f3 m1 m2 m3; do printf "espeak:%s+%s," $a $v; done; done)
VOICES="${ESPEAK}mbrola,flite,piper"
HOLD_OUT=espeak:en-us+f3,espeak:en-gb-x-rp+m3,espeak:en-gb-scotland+f2,espeak:en-029+m2,espeak:en-gb-x-gbclan+f1
HOLD_OUT=$HOLD_OUT,espeak:en-gb-x-gbcwmd+m1,mbrola:mb-de5-en,mbrola:mb-fr4-en,mbrola:mb-sw2-en,mbrola:mb-us3
HOLD_OUT=$HOLD_OUT,mbrola:mb-de2-en,flite:rms
SPLIT="--voices $VOICES --hold-out $HOLD_OUT"

desta synth --out $DATA/corpus --num-clips 1200 --num-proc 2 $SPLIT --split train            # ~2 min
desta synth --out $DATA/corpus-eval --num-clips 96 --seed 1 --num-proc 2 $SPLIT --split eval
python -c "import json, sys; from desta.audio.synth import compare_splits as c; print(json.dumps(c(*sys.argv[1:])))" \
    $DATA/corpus/manifest.jsonl $DATA/corpus-eval/manifest.jsonl | tee $DATA/splits.json
desta describe --source $DATA/corpus/manifest.jsonl --mapping synthetic --out $DATA/described
desta describe --source $DATA/corpus-eval/manifest.jsonl --mapping synthetic --out $DATA/described-eval
desta describe --source /usr/share/asterisk/sounds --mapping asterisk --out $DATA/described-real     # ~3 min
[ -d $DATA/evalset ] || desta eval-set --source $DATA/described-eval/dataset --out $DATA/evalset
[ -d $DATA/evalset-24 ] || desta eval-set --source $DATA/described-eval/dataset --out $DATA/evalset-24 --max-clips 24
# 24 clips (240 items) of the voices no training clip uses
[ -d $DATA/evalset-unseen-24 ] || desta eval-set --source $DATA/described-eval/dataset --out $DATA/evalset-unseen-24 \
    --max-clips 24 --unseen-voices-of $DATA/described/dataset
# the first 100 real clips by id: ids are <prompt>@<locale>, so each prompt comes in the languages that have it
[ -d $DATA/evalset-real ] || desta eval-set --source $DATA/described-real/dataset --out $DATA/evalset-real \
    --max-clips 100
