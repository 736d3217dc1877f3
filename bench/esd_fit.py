"""How far one erase run moves the student's velocity toward the ESD target, on a fixed held-out batch.

Usage: python bench/esd_fit.py CONCEPT '{"lr": 0.003, "eta": 1.5, "seed": 1}' [--weights DIR]

Prints the ESD loss ‖v_student(x_t, c) − (v(x_t, c⁻) − η(v(x_t, c) − v(x_t, c⁻)))‖² on 16 fixed noised base samples of
the concept's plain prompt before and after training, and the fraction of the way to the target that the change
covers (projection). A run that moves toward the target but ends with a larger loss is drifting sideways.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from erase_core.flux.flow import noised  # noqa: E402
from erase_core.losses import esd_target  # noqa: E402
from erase_core.sandbox.erase_sets import sandbox_concept_set  # noqa: E402
from erase_core.sandbox.prompts import concept_prompt  # noqa: E402
from erase_core.sandbox.world import CONCEPTS  # noqa: E402
from erase_core.tokens import replace_word  # noqa: E402
from erase_core.train import EraseConfig, erase  # noqa: E402
from bench.world_args import add_world_args, load_world  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("concept")
    p.add_argument("config", help="JSON object of EraseConfig keywords")
    add_world_args(p)
    args = p.parse_args()
    torch.set_num_threads(1)
    world = load_world(args)
    cfg = EraseConfig(**json.loads(args.config))
    c = CONCEPTS[args.concept]
    prompt = concept_prompt(c.name, c.axis)
    negative = replace_word(prompt, c.name, "")  # the trainer's "without_concept" reference
    x0 = world.sample_latents([prompt] * 16, seed=3)
    gen = torch.Generator().manual_seed(0)
    t = torch.rand(16, generator=gen) * 0.95 + 0.05
    x_t = noised(x0, torch.randn(x0.shape, generator=gen), t)
    cond, neg = world.encode([prompt] * 16), world.encode([negative] * 16)
    with torch.no_grad():
        v_c, v_n = world.backend().velocity(x_t, t, cond), world.backend().velocity(x_t, t, neg)
    target = esd_target(v_n, v_c, cfg.eta)
    res = erase(world, sandbox_concept_set(c.name), cfg)
    with torch.no_grad():
        v_e = world.backend(res.model).velocity(x_t, t, cond)
    moved = ((v_e - v_c) * (target - v_c)).sum() / ((target - v_c) ** 2).sum()
    print(json.dumps({"concept": c.name, "negative": negative, "config": json.loads(args.config),
                      "esd_before": ((v_c - target) ** 2).mean().item(), "esd_after": ((v_e - target) ** 2).mean().item(),
                      "fraction_toward_target": moved.item()}))


if __name__ == "__main__":
    main()
