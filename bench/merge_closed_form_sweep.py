"""Closed-form merge variants: the preserve weight λ, and which rows stand for "a LoRA's effect" and "preserve".

Runs after bench/merge_table.py (reuses its LoRAs and its base/single-LoRA rates). A variant is KIND@λ:
  word@λ     the shipped closed form: concept rows = the concept word's tokens, preserve rows = the kept words' tokens
  content@λ  the same with every content token of the prompts (word and context) on both sides
  proj@λ     no concept rows: the exact sum Σ ΔW_i pushed off the preserved rows, ΔW = (Σ ΔW_i)(λ C_p / c̄ + I)⁻¹
Usage: python bench/merge_closed_form_sweep.py [--variants word@1,word@1000] [--samples 64] [--out bench/results/merge_16k]
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
from erase_core.kv_edit import token_module_inputs  # noqa: E402
from erase_core.lora_file import LoraFile, read_lora_file  # noqa: E402
from erase_core.merge import MergeConfig, low_rank, merge  # noqa: E402
from erase_core.sandbox.erase_sets import concept_prompts  # noqa: E402
from bench.world_args import add_world_args, load_world  # noqa: E402
from merge_table import KEEP, ORDER, rate, with_lora  # noqa: E402


def content_inputs(world, name: str, modules: list[str], n: int = 8, times=(0.3, 0.6, 0.9), seed: int = 0):
    """Per module, the rows at every content token of the concept's prompts (word and context)."""
    prompts = concept_prompts(name, n=n, seed=seed)
    return token_module_inputs(world, prompts, world.content_rows(prompts), modules, times, seed)


def projected_sum(loras: list[LoraFile], preserve: dict[str, torch.Tensor], lam: float) -> LoraFile:
    """ΔW = (Σ ΔW_i)(λ C_p / c̄ + I)⁻¹ per module, C_p the preserved rows' second moment, c̄ its mean diagonal."""
    out = {}
    for key in sorted(loras[0].modules):
        total = sum(lf.modules[key].delta() for lf in loras)
        xp = preserve[key].double()
        c = xp.T @ xp / xp.shape[0]
        c = c / c.diagonal().mean()
        delta = torch.linalg.solve(lam * c + torch.eye(c.shape[0], dtype=c.dtype), total.T).T
        out[key] = low_rank(delta, sum(lf.modules[key].rank for lf in loras))
    return LoraFile(out, {})


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--variants", default="word@1,word@1000")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("bench/results/merge_16k"))
    add_world_args(p)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    table = json.loads((args.out / "table.json").read_text())
    base, single = table["base"], table["single"]
    world = load_world(args)
    loras = [read_lora_file(args.out / "loras" / f"{c}.safetensors") for c in ORDER]
    modules = sorted(loras[0].modules)
    ci, pi = closed_form_inputs(world, loras, list(KEEP))
    rows = []
    for variant in args.variants.split(","):
        kind, lam = variant.split("@")
        lam = float(lam)
        if kind == "word":
            merged = merge(loras, MergeConfig(mode="closed_form", preserve_weight=lam), ci, pi)
        elif kind == "content":
            per = [content_inputs(world, k, modules) for k in KEEP]
            merged = merge(loras, MergeConfig(mode="closed_form", preserve_weight=lam),
                           [content_inputs(world, c, modules) for c in ORDER],
                           {m: torch.cat([x[m] for x in per]) for m in modules})
        elif kind == "proj":
            merged = projected_sum(loras, pi, lam)
        else:
            raise ValueError(f"variant {variant!r}: KIND must be word, content or proj")
        model = with_lora(world, merged)
        erased = {c: rate(world, c, args.samples, model) for c in ORDER}
        kept = {c: rate(world, c, args.samples, model) for c in KEEP}
        share = {c: (base[c] - erased[c]) / max(base[c] - single[c], 1e-9) for c in ORDER}
        row = {"variant": variant, "lambda": lam, "mean_efficacy_share": sum(share.values()) / len(share),
               "min_efficacy_share": min(share.values()), "worst": min(share, key=share.get),
               "kept_ge_90": sum(s >= 0.9 for s in share.values()),
               "acc_ir_of_base": 100 * sum(kept.values()) / sum(base[c] for c in KEEP), "kept": kept,
               "efficacy_share": share}
        logging.info("%s: share %.2f (min %.2f %s, %d ≥ 90 %%), Acc_ir %.1f%%", variant, row["mean_efficacy_share"],
                     row["min_efficacy_share"], row["worst"], row["kept_ge_90"], row["acc_ir_of_base"])
        rows.append(row)
    atomic_write_text(args.out / "closed_form_sweep.json", json.dumps(rows, indent=2))
    md = ["| variant | mean share of single-LoRA erasure kept | concepts ≥ 90 % kept | worst concept | "
          "Acc_ir (% of base) |", "|---|---|---|---|---|"]
    md += [f"| {r['variant']} | {100 * r['mean_efficacy_share']:.0f}% | {r['kept_ge_90']} / {len(ORDER)} | "
           f"{r['worst']} {100 * r['min_efficacy_share']:.0f}% | {r['acc_ir_of_base']:.0f}% |" for r in rows]
    atomic_write_text(args.out / "closed_form_sweep.md", "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
