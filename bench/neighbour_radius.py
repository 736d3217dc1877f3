"""How far can a concept's embedding move before the base model stops drawing it? The measurement behind
NeighbourConfig's D1/D2/S1/S2 defaults: samples mined uniformly in radius r/‖e‖ ∈ [0, 1.6] (no cosine filter),
binned by radius, with the share of base-model images that still show the concept.

Usage: python bench/neighbour_radius.py [--concepts red,west,moon] [--m 32] [--samples 8] [--out FILE.json]
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from erase_core.io import atomic_write_text  # noqa: E402
from erase_core.neighbour_preview import preview  # noqa: E402
from erase_core.neighbours import NeighbourConfig  # noqa: E402
from bench.world_args import add_world_args, load_world  # noqa: E402

BINS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.6)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--concepts", default="red,west,moon")
    p.add_argument("--m", type=int, default=32)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("bench/results/neighbour_radius.json"))
    add_world_args(p)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    world = load_world(args)
    cfg = NeighbourConfig(d1=1.6, d2=1.7, s1=1.0, s2=-1.0, m=args.m, n=0)
    out = {}
    for name in args.concepts.split(","):
        rows = preview(world, name, cfg, samples=args.samples)[1:]
        table = {}
        for lo, hi in zip(BINS, BINS[1:]):
            sel = [r for r in rows if lo <= r.distance < hi]
            if sel:
                table[f"{lo:.1f}-{hi:.1f}"] = {"n": len(sel), "rate": sum(r.base_rate for r in sel) / len(sel),
                                               "mean_cos": sum(r.cosine for r in sel) / len(sel),
                                               "nearest": sorted({r.labels[0][0] for r in sel})}
        out[name] = table
        print(name, json.dumps({k: (v["n"], round(v["rate"]), round(v["mean_cos"], 3)) for k, v in table.items()}),
              flush=True)
    atomic_write_text(args.out, json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
