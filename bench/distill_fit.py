"""How closely the distilled merge fits each teacher, on its training rows and on rows it never saw.

Distils the twenty LoRAs of ``--loras`` (closed-form start, DistillConfig from ``--cfg``), then per LoRA i the
relative error E‖v_θ − v_i‖² / E‖v_i − v_0‖² on the training pool and on a held-out pool (fresh samples and noise,
distill seed 77, one noising per image), the preserved rows' mean squared error on both, and each concept's share of
its single-LoRA erasure kept (64 samples per prompt, seed 4242, against OUT-of-table base and single rates).
A training error well below the held-out one means the fixed rows are being memorised.

Usage: python bench/distill_fit.py --out DIR [--cfg '{"noisings": 4}'] [--loras DIR] [--table TABLE.json]
"""
import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.merge_table import COMPOSITE, KEEP, ORDER, rate, with_lora  # noqa: E402
from bench.world_args import add_world_args, load_world  # noqa: E402
from erase_core import merge_distill as md  # noqa: E402
from erase_core.cli_merge import closed_form_inputs, distill_prompts  # noqa: E402
from erase_core.evaluate import found_rate  # noqa: E402
from erase_core.flux.deltas import added_deltas, folded_factors  # noqa: E402
from erase_core.io import atomic_write_text  # noqa: E402
from erase_core.lora_file import read_lora_file, write_lora_file  # noqa: E402
from erase_core.merge import MergeConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "merge_22k_s200_64"
log = logging.getLogger("bench")


def row_errors(backend, merged, pool, batch: int) -> torch.Tensor:
    """‖v_θ − target‖² per row of ``pool``, v_θ the base plus ``merged``."""
    with added_deltas(backend, folded_factors(merged)):
        v = md._velocities(backend, pool.x_t, pool.t, pool.text, pool.prompt, batch)
    return ((v - pool.target) ** 2).flatten(1).mean(1)


def relative_errors(backend, merged, pool, batch: int) -> dict[str, float]:
    """Per LoRA E‖v_θ − v_i‖² / E‖v_i − v_0‖² over its rows of ``pool``."""
    err, gap = row_errors(backend, merged, pool, batch), md.teacher_gaps(backend, pool, len(ORDER), batch)
    return {c: (err[pool.owner == i].mean() / gap[i]).item() for i, c in enumerate(ORDER)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cfg", default="{}", help="DistillConfig fields as JSON")
    p.add_argument("--loras", type=Path, default=RESULTS / "loras")
    p.add_argument("--table", type=Path, default=RESULTS / "table.json", help="its base and single-LoRA rates")
    p.add_argument("--samples", type=int, default=64)
    add_world_args(p)
    a = p.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    a.out.mkdir(parents=True, exist_ok=True)
    world = load_world(a)
    files = [read_lora_file(a.loras / f"{c}.safetensors") for c in ORDER]
    cfg = md.DistillConfig(**json.loads(a.cfg))
    ci, pi = closed_form_inputs(world, files, list(KEEP))
    prompts, keep = distill_prompts(files, list(KEEP))
    pools = {}
    build = md.distill_pools

    def kept_pools(*args, **kw):  # the training pool, as distill builds it
        pools["train"] = build(*args, **kw)
        return pools["train"]

    md.distill_pools = kept_pools
    t = time.time()
    try:
        merged, history = md.distill_merge(world, files, MergeConfig(mode="distill"), prompts, keep, ci, pi, cfg,
                                           names=list(ORDER))
    finally:
        md.distill_pools = build
    log.info("distill %.0f s", time.time() - t)
    write_lora_file(merged, a.out / "merged.safetensors", overwrite=True)
    held = build(world, files, prompts, keep, replace(cfg, seed=77, noisings=1))
    backend = world.backend()
    res = {"cfg": cfg.to_dict(), "last": history[-1],
           "train_rel": relative_errors(backend, merged, pools["train"][0], cfg.batch),
           "held_rel": relative_errors(backend, merged, held[0], cfg.batch),
           "train_keep": row_errors(backend, merged, pools["train"][1], cfg.batch).mean().item(),
           "held_keep": row_errors(backend, merged, held[1], cfg.batch).mean().item()}
    table = json.loads(a.table.read_text())
    model = with_lora(world, merged)
    res["rates"] = {c: rate(world, c, a.samples, model) for c in list(ORDER) + list(KEEP)}
    res["share"] = {c: (table["base"][c] - res["rates"][c]) / max(table["base"][c] - table["single"][c], 1e-9)
                    for c in ORDER}
    found = sum(found_rate(world, q, c, a.samples, seed=4242, transformer=model)
                for q in COMPOSITE for c in KEEP if c in q.split())
    res["composite_of_base"] = 100 * found / table["base_composite"]
    atomic_write_text(a.out / "fit.json", json.dumps(res, indent=2))
    mean = {k: sum(res[k].values()) / len(ORDER) for k in ("train_rel", "held_rel")}
    log.info("mean relative error: training rows %.4f, held-out rows %.4f; preserved rows %.2e / %.2e",
             mean["train_rel"], mean["held_rel"], res["train_keep"], res["held_keep"])
    log.info("mean share %.3f, ≥ 90 %%: %d, composites %.1f %%", sum(res["share"].values()) / len(ORDER),
             sum(v >= 0.9 for v in res["share"].values()), res["composite_of_base"])


if __name__ == "__main__":
    main()
