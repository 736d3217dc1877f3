#!/bin/bash
# Residue on `square` (the one shape with residue left on the default world): EraseAnything vs +neighbours (lambda_beyond=0), three training seeds, 200 steps
cd /work/main
for s in 0 1 2; do
  python3 bench/erase_table.py --concepts square --methods eraseanything,eraseanything+neighbors --config lambda_beyond=0 --config seed=$s --no-suppression --threads 1 --out /work/runs/s9/square_seed$s
done
