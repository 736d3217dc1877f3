#!/usr/bin/env bash
# Rebuild the shipped sandbox weights from scratch, exactly as they were made (seed 0).
# Usage: bash scripts/train_sandbox.sh OUT_DIR      (then copy OUT_DIR's files into erase_core/sandbox/weights)
# (`sandbox train --device cuda` runs a transformer stage on a GPU: same command, statistically the same result.)
# Each stage resumes the previous one from OUT_DIR/flux_checkpoint.pt (weights, optimiser, RNG states), so the
# three stages give the same weights as one uninterrupted run of this schedule. Times on 2 CPU cores:
#   1. tokenizer, autoencoder (800 steps), classifier (1,000 steps), transformer steps 0-4,000 at logit-normal
#      time location 0                                                  ~ 10 min + 50 min
#   2. transformer steps 4,000-6,500, times shifted to high noise (t_mean 1.0), where shapes are decided   ~ 40 min
#   3. transformer steps 6,500-8,500 of an 11,000-step schedule at t_mean 1.0 (the shipped weights)           ~ 25-47 min
set -euo pipefail
OUT=${1:?usage: bash scripts/train_sandbox.sh OUT_DIR}
export TOKENIZERS_PARALLELISM=false
python3 -m erase_core sandbox train --out "$OUT" --seed 0 --flux-steps 4000
python3 -m erase_core sandbox train --out "$OUT" --seed 0 --flux-steps 6500 --t-mean 1.0 --stages flux
python3 -m erase_core sandbox train --out "$OUT" --seed 0 --flux-steps 11000 --t-mean 1.0 --stages flux --stop-at 8500
