#!/usr/bin/env bash
# Installs what desta's voice catalogue and real-speech corpus need on Debian (bookworm or later):
#   - Debian's libespeak-ng and mbrola with the 20 MBROLA voices that read English (contrib/non-free:
#     this script enables those sections; MBROLA voices are for non-commercial, non-military use only),
#   - flite and its voices,
#   - the Asterisk prompts in five languages as G.722 with their transcripts (real recorded speech),
#   - with a virtualenv active: desta's `voices` extra (g722, piper-tts and its joe voice).
# Idempotent: when everything is installed it changes nothing and takes about a second. Runs as root, or
# through sudo when that exists.
#   bash tools/install_voices.sh
set -euo pipefail
cd "$(dirname "$0")/.."

MBROLA_VOICES="en1 us1 us2 us3 af1 de1 de2 de3 de4 de5 de6 fr1 fr4 gr2 hu1 nl2 pl1 ro1 sw1 sw2"
LANGUAGES="en es fr it ru"
PACKAGES="libespeak-ng1 espeak-ng-data mbrola flite"
for v in $MBROLA_VOICES; do PACKAGES="$PACKAGES mbrola-$v"; done
for l in $LANGUAGES; do PACKAGES="$PACKAGES asterisk-core-sounds-$l asterisk-core-sounds-$l-g722"; done

if [ "$(id -u)" = 0 ]; then
  as_root() { "$@"; }
elif command -v sudo >/dev/null; then
  as_root() { sudo "$@"; }
else
  echo "install_voices: not root and no sudo; as root run: bash tools/install_voices.sh" >&2
  exit 1
fi

missing=""
for p in $PACKAGES; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done

if [ -n "$missing" ]; then
  # MBROLA voices live in contrib (the mbrola-XX wrappers) and non-free (mbrola itself): enable both
  # on Debian's own sources, in the deb822 file or in a classic sources.list.
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    as_root sed -i -E '/^Components:/{/(^| )contrib( |$)/!s/$/ contrib/;/(^| )non-free( |$)/!s/$/ non-free/}' \
      /etc/apt/sources.list.d/debian.sources
  fi
  if [ -f /etc/apt/sources.list ]; then
    as_root sed -i -E '/^deb(-src)? .*debian.* main/{/ contrib( |$)/!s/ main( |$)/ main contrib\1/;/ non-free( |$)/!s/ main contrib( |$)/ main contrib non-free\1/}' \
      /etc/apt/sources.list
  fi
  echo "install_voices: installing$missing"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

if [ -n "${VIRTUAL_ENV:-}" ]; then
  python -m pip install -q -e ".[voices]"
fi
echo "install_voices: espeak-ng, MBROLA ($(echo $MBROLA_VOICES | wc -w) voices), flite, Asterisk prompts ($LANGUAGES) installed"
