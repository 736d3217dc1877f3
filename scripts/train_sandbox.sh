#!/usr/bin/env bash
# Rebuild the shipped sandbox weights from scratch, exactly as they were made (seed 0).
# Usage: [DEVICE=cuda] [WITH_22K=1] bash scripts/train_sandbox.sh OUT_DIR   (then copy OUT_DIR's files into
# erase_core/sandbox/weights, the step-16,000 world, and OUT_DIR_22k's into erase_core/sandbox/weights_22k, the default)
# Each stage resumes the previous one from OUT_DIR/flux_checkpoint.pt (weights, optimiser, RNG states), so the
# stages on a CPU give the same weights as one uninterrupted run. Times on 2 CPU cores:
#   1. tokenizer, autoencoder (800 steps), classifier (1,000 steps), transformer steps 0-4,000 at logit-normal
#      time location 0                                                  ~ 10 min + 50 min
#   2. transformer steps 4,000-6,500, times shifted to high noise (t_mean 1.0), where shapes are decided   ~ 40 min
#   3. transformer steps 6,500-8,500 of an 11,000-step schedule at t_mean 1.0                                 ~ 25-47 min
#   4. steps 8,500-11,000, the end of that schedule                                                  ~ 30-75 min
#   5. steps 11,000-16,000 with the schedule stretched to 16,000 steps (the shipped weights)         ~ 1-2.5 h
#   6. optional (WITH_22K=1): a copy in OUT_DIR_22k trained on to 22,000 steps (erase_core/sandbox/weights_22k, the
#      default world, which passes the quality bar with its sampler.json: 24 steps, CFG 3.5, shift 3)               H100 8 min; ~ 1.5-3 h
# Stages 4-5 of the shipped weights ran on a GPU (DEVICE=cuda, 0.1 s/step), except the last 500 steps; a GPU draws
# other random numbers than a CPU, so those stages reproduce the weights statistically, not bit for bit.
set -euo pipefail
OUT=${1:?usage: bash scripts/train_sandbox.sh OUT_DIR}
export TOKENIZERS_PARALLELISM=false
python3 -m erase_core sandbox train --out "$OUT" --seed 0 --flux-steps 4000
python3 -m erase_core sandbox train --out "$OUT" --seed 0 --flux-steps 6500 --t-mean 1.0 --stages flux
python3 -m erase_core sandbox train --out "$OUT" --seed 0 --flux-steps 11000 --t-mean 1.0 --stages flux --stop-at 8500
python3 -m erase_core sandbox train --out "$OUT" --seed 0 --flux-steps 11000 --t-mean 1.0 --stages flux --device "${DEVICE:-cpu}"
python3 -m erase_core sandbox train --out "$OUT" --seed 0 --flux-steps 16000 --t-mean 1.0 --stages flux --device "${DEVICE:-cpu}"
if [ "${WITH_22K:-0}" = 1 ]; then
  rm -rf "$OUT"_22k; cp -r "$OUT" "$OUT"_22k
  python3 -m erase_core sandbox train --out "$OUT"_22k --seed 0 --flux-steps 22000 --t-mean 1.0 --stages flux --device "${DEVICE:-cpu}"
  echo '{"steps": 24, "cfg": 3.5, "shift": 3.0}' > "$OUT"_22k/sampler.json
fi
