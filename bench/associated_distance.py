"""Where the sandbox's associated prompts sit in the text embedding, against the concept and the other shapes.

RealEra's neighbours are the concept's embedding e plus a random perturbation of radius ≤ D1·‖e‖. They can only help
against concept residue if the prompts that imply the concept (`the sun` → circle) lie nearer to e than the concepts
that must be kept. Per shape: the text encoder's output at the word's tokens (mean over its token rows) in its plain
prompt, its associated prompts and every other shape's plain prompt; cosine to e and distance ‖a − e‖ / ‖e‖.

Usage: python bench/associated_distance.py [--out bench/results/associated_distance]
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from erase_core.io import atomic_write_text  # noqa: E402
from erase_core.neighbours import NeighbourConfig, mine  # noqa: E402
from erase_core.sandbox.prompts import concept_prompt  # noqa: E402
from erase_core.sandbox.world import AXES, CONCEPTS  # noqa: E402
from bench.world_args import add_world_args, load_world  # noqa: E402


@torch.no_grad()
def word_embedding(world, prompt: str, word: str) -> torch.Tensor:
    """Mean over the word's token rows of the text encoder's output for ``prompt``."""
    idx = world.token_indices(prompt, word)
    return world.encode([prompt]).sequence[0, idx].mean(0)


def relation(e: torch.Tensor, a: torch.Tensor) -> dict:
    return {"cos": torch.nn.functional.cosine_similarity(e, a, dim=0).item(),
            "distance": ((a - e).norm() / e.norm()).item()}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=Path("bench/results/associated_distance"))
    add_world_args(p)
    args = p.parse_args()
    torch.set_num_threads(1)
    world = load_world(args)
    shapes = [s for s in AXES["shape"] if s in CONCEPTS]
    plain = {s: word_embedding(world, concept_prompt(s, "shape"), s) for s in shapes}
    rows = {}
    for name in shapes:
        e = plain[name]
        near, _ = mine(e, NeighbourConfig(m=2000, n=1))  # the default bounds, many samples
        others = {o: relation(e, plain[o]) for o in shapes if o != name}
        nearest = min(others, key=lambda o: others[o]["distance"])
        assoc = {}
        for a in CONCEPTS[name].associated:
            emb = word_embedding(world, a, a.split()[-1])
            assoc[a] = {**relation(e, emb),
                        "neighbours_median_distance": ((near - emb).norm(dim=1) / e.norm()).median().item()}
        rows[name] = {"associated": assoc, "other_shapes": others, "nearest_shape": nearest,
                      "neighbours_median_distance_to_nearest_shape":
                          ((near - plain[nearest]).norm(dim=1) / e.norm()).median().item()}
    nb = NeighbourConfig()
    report = {"neighbour_bounds": {"d1": nb.d1, "s2": nb.s2, "s1": nb.s1}, "shapes": rows,
              "note": "mean over the word's token rows; distance relative to the concept's norm"}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "table.json", json.dumps(report, indent=2))
    md = [f"Associated prompts against the other shapes, in the sandbox's text embedding (neighbours: distance ≤ "
          f"D1 = {nb.d1}, cos ≥ S2 = {nb.s2}).", "",
          "| shape | associated prompt: cos / distance from e / median distance from 2000 mined neighbours "
          "| nearest other shape: distance from e / from the neighbours (median) |",
          "|---|---|---|"]
    for name, r in rows.items():
        if not r["associated"]:
            continue
        nearest = r["nearest_shape"]
        md.append(f"| {name} | " + "; ".join(f"{a}: {v['cos']:.2f} / {v['distance']:.2f} / "
                                         f"{v['neighbours_median_distance']:.2f}" for a, v in r["associated"].items())
                  + f" | {nearest}: {r['other_shapes'][nearest]['distance']:.2f} / "
                    f"{r['neighbours_median_distance_to_nearest_shape']:.2f} |")
    atomic_write_text(args.out / "table.md", "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
