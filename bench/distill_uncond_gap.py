"""How much of each erase-LoRA's effect under classifier-free guidance comes through the unconditional branch.

Per LoRA i, on x_t from 16 base samples of its concept's plain prompt (t uniform in [0.05, 1], seed 0):
gap_c = E‖v_i(p) − v_0(p)‖², gap_u = E‖v_i(∅) − v_0(∅)‖², guided_gap = E‖ṽ_i − ṽ_0‖² with ṽ = (1 − g) v(∅) + g v(p),
and uncond_miss = E‖(1 − g)(v_0(∅) − v_i(∅))‖²: what a merge that keeps ∅ at the base and matches v_i(p) exactly
misses of teacher i's guided velocity (the part DistillConfig.guided_targets moves into the targets).

Usage: python bench/distill_uncond_gap.py --loras bench/results/merge_22k_s200_64/loras [--out FILE.json]
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from erase_core.flux.deltas import added_deltas, folded_factors  # noqa: E402
from erase_core.flux.flow import noised  # noqa: E402
from erase_core.io import atomic_write_text  # noqa: E402
from erase_core.lora_file import read_lora_file  # noqa: E402
from erase_core.sandbox.prompts import concept_prompt  # noqa: E402
from erase_core.sandbox.world import CONCEPTS  # noqa: E402
from bench.world_args import add_world_args, load_world  # noqa: E402


def mean_sq(a: torch.Tensor) -> float:
    return (a ** 2).flatten(1).mean(1).mean().item()


@torch.no_grad()
def gaps(world, lf, name: str, n: int = 16) -> dict[str, float]:
    g, be = world.cfg_scale, world.backend()
    prompt = concept_prompt(name, CONCEPTS[name].axis)
    x0 = world.sample_latents([prompt] * n, seed=7)
    gen = torch.Generator().manual_seed(0)
    t = 0.05 + 0.95 * torch.rand(n, generator=gen)
    x_t = noised(x0, torch.randn(x0.shape, generator=gen), t)
    c, u = world.encode([prompt] * n), world.encode([""] * n)
    v0c, v0u = be.velocity(x_t, t, c), be.velocity(x_t, t, u)
    with added_deltas(be, folded_factors(lf)):
        vic, viu = be.velocity(x_t, t, c), be.velocity(x_t, t, u)
    return {"gap_c": mean_sq(vic - v0c), "gap_u": mean_sq(viu - v0u),
            "guided_gap": mean_sq((1 - g) * (viu - v0u) + g * (vic - v0c)),
            "uncond_miss": mean_sq((1 - g) * (viu - v0u))}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--loras", type=Path, required=True, help="folder of <concept>.safetensors erase-LoRAs")
    p.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    add_world_args(p)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    world = load_world(args)
    out = {}
    for path in sorted(args.loras.glob("*.safetensors")):
        lf = read_lora_file(path)
        name = str(lf.meta.get("concept", path.stem))
        out[name] = gaps(world, lf, name)
        r = out[name]
        print(f"{name}: gap_c {r['gap_c']:.5f}, gap_u {r['gap_u']:.5f}, guided {r['guided_gap']:.5f}, "
              f"through ∅ {100 * r['uncond_miss'] / r['guided_gap']:.0f} %", flush=True)
    if args.out:
        atomic_write_text(args.out, json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
