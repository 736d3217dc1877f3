#!/usr/bin/env bash
# Installs everything the pack's engine needs on a fresh Debian machine with Python 3.11:
#   CPU torch 2.13.0 (exactly: any other spec pulls GBs of CUDA wheels), the pinned requirements,
#   Debian's WordNet made readable by NLTK offline (no nltk.download at run time).
# Usage: bash scripts/install.sh [--test]     (--test adds the test tools)
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
if [ ! -f /usr/share/wordnet/index.sense ] || [ ! -f /usr/share/man/man5/lexnames.5WN.gz ]; then
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends wordnet-base wordnet-sense-index
fi
NLTK_DIR="${NLTK_DATA:-/usr/share/nltk_data}"
$SUDO python3 scripts/install_wordnet.py "$NLTK_DIR"
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -r requirements.txt
if [ "${1:-}" = "--test" ]; then
  python3 -m pip install -q -r requirements-dev.txt
fi
echo "install: done"
