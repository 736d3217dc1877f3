"""Closed-form merge: the preserve weight λ trades erasure kept against the untouched concepts (Acc_ir).

Runs after bench/merge_table.py (reuses its LoRAs and its base/single-LoRA rates).
Usage: python bench/merge_closed_form_sweep.py [--lams 1,10,100] [--samples 32] [--out bench/results/merge]
"""
import argparse
import json
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from erase_core.cli_merge import closed_form_inputs  # noqa: E402
from erase_core.io import atomic_write_text  # noqa: E402
from erase_core.lora_file import read_lora_file  # noqa: E402
from erase_core.merge import MergeConfig, merge  # noqa: E402
from erase_core.sandbox.pipeline import SandboxWorld  # noqa: E402
from merge_table import KEEP, ORDER, rate, with_lora  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--lams", default="1,10,100")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("bench/results/merge"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    table = json.loads((args.out / "table.json").read_text())
    base, single = table["base"], table["single"]
    world = SandboxWorld.load()
    loras = [read_lora_file(args.out / "loras" / f"{c}.safetensors") for c in ORDER]
    ci, pi = closed_form_inputs(world, loras, list(KEEP))
    rows = []
    for lam in (float(x) for x in args.lams.split(",")):
        model = with_lora(world, merge(loras, MergeConfig(mode="closed_form", preserve_weight=lam), ci, pi))
        erased = {c: rate(world, c, args.samples, model) for c in ORDER}
        kept = {c: rate(world, c, args.samples, model) for c in KEEP}
        share = {c: (base[c] - erased[c]) / max(base[c] - single[c], 1e-9) for c in ORDER}
        row = {"lambda": lam, "mean_efficacy_share": sum(share.values()) / len(share),
               "min_efficacy_share": min(share.values()), "worst": min(share, key=share.get),
               "acc_ir_of_base": 100 * sum(kept.values()) / sum(base[c] for c in KEEP), "kept": kept,
               "efficacy_share": share}
        logging.info("lambda %s: share %.2f (min %.2f %s), Acc_ir %.1f%%", lam, row["mean_efficacy_share"],
                     row["min_efficacy_share"], row["worst"], row["acc_ir_of_base"])
        rows.append(row)
    atomic_write_text(args.out / "closed_form_sweep.json", json.dumps(rows, indent=2))
    md = ["| λ (preserve weight) | mean share of single-LoRA erasure kept | worst concept | Acc_ir (% of base) |",
          "|---|---|---|---|"] + [f"| {r['lambda']:g} | {100 * r['mean_efficacy_share']:.0f}% | {r['worst']} "
                                  f"{100 * r['min_efficacy_share']:.0f}% | {r['acc_ir_of_base']:.0f}% |" for r in rows]
    atomic_write_text(args.out / "closed_form_sweep.md", "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
