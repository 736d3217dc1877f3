#!/bin/bash
# Residue on `square` (the one shape with residue left on the default world): EraseAnything vs +neighbours
# (lambda_beyond=0), three training seeds, the default 200 steps. Run from anywhere; writes seedS.json beside this file.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/../../../.."
tmp=$(mktemp -d)
for s in 0 1 2; do
  python3 bench/erase_table.py --concepts square --methods eraseanything,eraseanything+neighbors \
    --config lambda_beyond=0 --config seed=$s --no-suppression --threads 1 --out "$tmp/seed$s"
  cp "$tmp/seed$s/table.json" "$here/seed$s.json"
done
