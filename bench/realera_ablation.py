"""RealEra's Table 3 on the sandbox (closed form only; + noise alignment; + neighbours; + beyond-concept
regularisation) and a sweep over the neighbour radius D1 and the neighbour count M.

Usage: python bench/realera_ablation.py [--concepts red,west] [--samples 64] [--out bench/results/realera_ablation]
Writes table.md and table.json (rows as bench/erase_table.py's). Slow: about 2.5 min per row on one thread.
"""
import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from erase_core.evaluate import evaluate_erasure  # noqa: E402
from erase_core.io import atomic_write_text  # noqa: E402
from erase_core.kv_edit import closed_form_erase  # noqa: E402
from erase_core.lora import apply_lora  # noqa: E402
from erase_core.neighbours import NeighbourConfig  # noqa: E402
from erase_core.realera import realera  # noqa: E402
from erase_core.sandbox.erase_sets import sandbox_concept_set  # noqa: E402
from erase_core.train import EraseConfig  # noqa: E402
from bench.world_args import add_world_args, load_world, start_run  # noqa: E402
from erase_table import markdown, others_of, row  # noqa: E402

D = NeighbourConfig()
#: label → neighbours (None: no mining); "closed form only" skips the alignment
ABLATION = {
    "closed form only (UCE)": None,
    "closed form + alignment": None,
    "+ neighbours (M = 8, no beyond-concept)": NeighbourConfig(n=0),
    "+ beyond-concept regularisation (RealEra)": D,
}
SWEEP = {f"D1 = {d:g}": NeighbourConfig(d1=d, d2=max(2 * d, D.d2)) for d in (0.4, 1.2)}
SWEEP.update({f"M = {m}": NeighbourConfig(m=m) for m in (2, 32)})


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--concepts", default="red,west")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--out", type=Path, default=Path("bench/results/realera_ablation"))
    p.add_argument("--threads", type=int, default=1)
    add_world_args(p)
    args = p.parse_args()
    start_run(args)
    world = load_world(args)
    rows = []
    for name in args.concepts.split(","):
        cs, others = sandbox_concept_set(name), others_of(name)
        base = evaluate_erasure(world, name, samples=args.samples, others=others)
        rows.append(row(name, "base model", base, base, 0.0))
        for label, nb in {**ABLATION, **SWEEP}.items():
            t = time.time()
            if label.startswith("closed form only"):
                lf = closed_form_erase(world, cs)
            else:
                _, lf = realera(world, cs, EraseConfig(method="realera"), neighbours=nb)
            seconds = time.time() - t
            model = apply_lora(copy.deepcopy(world.transformer), lf)
            m = evaluate_erasure(world, name, transformer=model, samples=args.samples, others=others)
            rows.append({**row(name, label, m, base, seconds), "neighbours": None if nb is None else vars(nb)})
            logging.info("%s %s: H_o %.1f", name, label, m.h_o)
            atomic_write_text(args.out / "table.json", json.dumps({"rows": rows}, indent=2))
    md = markdown(rows, f"RealEra ablation and D1/M sweep on the sandbox ({args.samples} samples per prompt, "
                        f"{EraseConfig().steps} alignment steps, {torch.get_num_threads()} thread)")
    atomic_write_text(args.out / "table.md", md)
    print(md)


if __name__ == "__main__":
    main()
