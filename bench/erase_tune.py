"""Choose EraseConfig defaults: config variants (each may carry its own seed) × concepts, scored with the full
evaluator (Acc_e, Acc_ir over every other concept, Acc_g over the attacks, H_o) at few samples per prompt.

Usage: python bench/erase_tune.py CONCEPTS SAMPLES OUT.json '{"label": {"lr": 0.003, "seed": 1}, ...}' [--weights DIR]
       [--no-base]   (skip the base-model evaluation; its numbers are the same for every variant)

Appends to OUT.json after every run, so a long sweep can be read (or killed) midway. Used for the step-16,000
weights' defaults (README, docs/erase_benchmark.md); two processes of one thread each on 2 cores.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from erase_core.evaluate import evaluate_erasure  # noqa: E402
from erase_core.io import atomic_write_text  # noqa: E402
from erase_core.sandbox.erase_sets import sandbox_concept_set  # noqa: E402
from erase_core.train import EraseConfig, erase  # noqa: E402
from bench.world_args import add_world_args, load_world  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("concepts")
    p.add_argument("samples", type=int)
    p.add_argument("out", type=Path)
    p.add_argument("variants", help="JSON object: label → EraseConfig keywords")
    p.add_argument("--no-base", action="store_true")
    add_world_args(p)
    args = p.parse_args()
    torch.set_num_threads(1)
    variants = json.loads(args.variants)
    world = load_world(args)
    results: dict = {}
    for name in args.concepts.split(","):
        results[name] = {}
        if not args.no_base:
            base = evaluate_erasure(world, name, samples=args.samples)
            results[name]["base"] = base.to_dict()
            print(name, "base", f"Acc_e {base.acc_e:.1f} Acc_ir {base.acc_ir:.1f} Acc_g {base.acc_g:.1f}", flush=True)
        for label, kw in variants.items():
            t = time.time()
            res = erase(world, sandbox_concept_set(name), EraseConfig(**kw))
            seconds = time.time() - t
            m = evaluate_erasure(world, name, transformer=res.model, samples=args.samples)
            results[name][label] = {**m.to_dict(), "train_s": seconds, "config": kw}
            print(name, label, f"{seconds:.0f}s Acc_e {m.acc_e:.1f} Acc_ir {m.acc_ir:.1f} Acc_g {m.acc_g:.1f} "
                  f"H_o {m.h_o:.1f}", flush=True)
            atomic_write_text(args.out, json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
