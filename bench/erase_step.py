"""Cost of one erase optimiser step vs one plain LoRA flow-matching step, on the sandbox, in one run.

EraseAnything alternates a lower-level (erase) step and an upper-level (preserve) step, each one optimiser step.
Both are timed against a plain LoRA flow-matching step (one forward + backward on the same batch size, same LoRA),
interleaved, on one thread; forwards are counted in sample rows.
Usage: python bench/erase_step.py [--batch 16] [--repeats 10] [--out FILE.json]
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from erase_core.flux.flow import noised  # noqa: E402
from erase_core.losses import flow_loss  # noqa: E402
from erase_core.sandbox.erase_sets import sandbox_concept_set  # noqa: E402
from erase_core.train import EraseConfig, Eraser  # noqa: E402
from bench.world_args import add_world_args, load_world  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", type=Path, default=None)
    add_world_args(p)
    args = p.parse_args()
    torch.set_num_threads(1)
    world = load_world(args)
    er = Eraser(world, sandbox_concept_set("red"), EraseConfig(batch=args.batch, base_samples=32))
    prompts = list(er.concept.prompts[: args.batch])

    def plain_step():
        x0 = er.concept_x0[: args.batch]
        noise = torch.randn_like(x0)
        t = torch.rand(args.batch)
        v = er.backend.velocity(noised(x0, noise, t), t, world.encode(prompts))
        loss = flow_loss(v, x0, noise)
        er.opt.zero_grad()
        loss.backward()
        er.opt.step()

    def timed(fn):
        t = time.thread_time()
        fn()
        return 1000 * (time.thread_time() - t)

    for fn in (plain_step, er.lower_step, er.upper_step):
        fn()  # warm-up
    plain, lower, upper = [], [], []
    er.forwards = {"teacher": 0, "student": 0}
    for _ in range(args.repeats):
        plain.append(timed(plain_step))
        lower.append(timed(er.lower_step))
        upper.append(timed(er.upper_step))
    rows = {k: v / args.repeats for k, v in er.forwards.items()}
    res = {"batch": args.batch, "plain_ms": min(plain), "lower_ms": min(lower), "upper_ms": min(upper),
           "lower_ratio": min(lower) / min(plain), "upper_ratio": min(upper) / min(plain),
           "mean_ratio_per_optimiser_step": (min(lower) + min(upper)) / 2 / min(plain),
           "forward_rows_per_outer_step": rows, "plain_forward_rows": args.batch}
    print(json.dumps(res, indent=2))
    if args.out:
        args.out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
