"""The erasure benchmark on the sandbox: every method on concepts of the three categories, like EraseAnything's
Table 3 plus H_o, an ablation over the loss terms like its Table 4, and before/after grids.

Usage: python bench/erase_table.py [--concepts moon,ring,red,blue,west,northeast] [--samples 64]
                                   [--steps N] [--ablation red,west] [--out bench/results/erase]
Writes table.md, table.json and grid_<concept>.png into --out. Slow: minutes per concept and method on 2 cores.
"""
import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from erase_core import render  # noqa: E402
from erase_core.evaluate import EraseMetrics, evaluate_erasure  # noqa: E402
from erase_core.flux.attention import AttentionPatch  # noqa: E402
from erase_core.io import atomic_write_text  # noqa: E402
from erase_core.sandbox.erase_sets import sandbox_concept_set  # noqa: E402
from erase_core.sandbox.prompts import concept_prompt  # noqa: E402
from erase_core.sandbox.world import CONCEPTS  # noqa: E402
from erase_core.train import EraseConfig, erase  # noqa: E402
from bench.world_args import add_world_args, load_world, start_run, world_name  # noqa: E402

ABLATION = {  # relative to EraseConfig's defaults; the last four undo one of our departures from the paper each
    "L_esd": dict(method="esd"),
    "L_esd + L_attn": dict(lambda_preserve=0.0, lambda_rsc=0.0),
    "L_esd + L_attn + L_lora": dict(lambda_rsc=0.0),
    "L_esd + L_attn + L_rsc": dict(lambda_preserve=0.0),
    "all (EraseAnything)": dict(),
    "all, LoRA on add_q/add_k only (paper)": dict(targets=("add_q_proj", "add_k_proj")),
    "all, ESD reference = empty prompt (paper)": dict(esd_negative="empty"),
    "all, preserve toward ε − x0 (paper)": dict(preserve_target="flow"),
    "all, synonyms not erased (paper)": dict(erase_synonyms=False),
}


def others_of(name: str) -> list[str]:
    """Acc_ir witnesses: every other concept on the same axis (the neighbours an erase damages first) and two
    concepts of each other axis (collateral through the other words of composite prompts)."""
    axis = CONCEPTS[name].axis
    same = [c for c in CONCEPTS if CONCEPTS[c].axis == axis and c != name]
    cross = {"shape": ("moon", "ring"), "colour": ("blue", "green"), "placement": ("west", "northeast")}
    return same + [c for a, cs in cross.items() if a != axis for c in cs]


class SuppressedWorld:
    """The base world whose sampler removes the concept word's columns in every block (deterministic baseline)."""

    def __init__(self, world, word):
        self.world, self.word = world, word

    def __getattr__(self, name):
        return getattr(self.world, name)

    def sample(self, prompts, seed=0, transformer=None, **kw):
        from erase_core.tokens import word_token_indices

        try:
            idx = [word_token_indices(self.world.tokenizer, p, self.word) for p in prompts]
        except ValueError:
            return self.world.sample(prompts, seed=seed, **kw)
        from erase_core.demo import all_blocks

        tr, blocks = self.world.transformer, all_blocks(self.world)
        with AttentionPatch(tr, idx, capture=False, suppress=0.0, blocks=[], suppress_blocks=blocks,
                            suppress_rows="all") as patch:
            return self.world.sample(prompts, seed=seed, patch=patch, **kw)


def train_method(world, cs, method: str, overrides: dict):
    """The erased transformer of one method: the trainer's methods, or the closed form (uce) / RealEra."""
    import copy

    from erase_core.lora import apply_lora

    if method == "uce":
        from erase_core.kv_edit import closed_form_erase

        return apply_lora(copy.deepcopy(world.transformer), closed_form_erase(world, cs))
    if method == "realera":
        from erase_core.realera import realera

        _, lf = realera(world, cs, EraseConfig(method="realera", **overrides))
        return apply_lora(copy.deepcopy(world.transformer), lf)
    return erase(world, cs, EraseConfig(method=method, **overrides)).model


def row(name: str, method: str, m: EraseMetrics, base: EraseMetrics, seconds: float) -> dict:
    return {"concept": name, "category": CONCEPTS[name].category, "method": method, "acc_e": m.acc_e,
            "acc_ir": m.acc_ir, "acc_ir_of_base": 100 * m.acc_ir / max(base.acc_ir, 1e-9), "acc_g": m.acc_g,
            "h_o": m.h_o, "seconds": seconds, "per_prompt": m.per_prompt}


def markdown(rows: list[dict], title: str) -> str:
    out = [f"### {title}", "", "| concept | category | method | Acc_e ↓ | Acc_ir ↑ (% of base) | Acc_g ↓ | H_o ↑ | train s |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['concept']} | {r['category']} | {r['method']} | {r['acc_e']:.1f} | {r['acc_ir']:.1f} "
                   f"({r['acc_ir_of_base']:.0f}%) | {r['acc_g']:.1f} | {r['h_o']:.1f} | {r['seconds']:.0f} |")
    methods = sorted({r["method"] for r in rows}, key=[r["method"] for r in rows].index)
    out += ["", "| method | mean Acc_e | mean Acc_ir (% of base) | mean Acc_g | mean H_o |", "|---|---|---|---|---|"]
    for mth in methods:
        rs = [r for r in rows if r["method"] == mth]
        mean = lambda k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
        out.append(f"| {mth} | {mean('acc_e'):.1f} | {mean('acc_ir'):.1f} ({mean('acc_ir_of_base'):.0f}%) | "
                   f"{mean('acc_g'):.1f} | {mean('h_o'):.1f} |")
    return "\n".join(out) + "\n"


def parse_overrides(items: list[str]) -> dict:
    """``KEY=VALUE`` pairs for EraseConfig fields, values parsed as JSON (never evaluated)."""
    fields = {f.name for f in dataclasses.fields(EraseConfig)}
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise SystemExit(f"--config {item!r}: expected KEY=VALUE with KEY an EraseConfig field")
        out[key] = json.loads(value)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--concepts", default="moon,ring,red,blue,west,northeast")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--steps", type=int, default=None, help="erase steps (default: EraseConfig's)")
    p.add_argument("--ablation", default="", help="comma-separated concepts to run the loss/design ablation on")
    p.add_argument("--methods", default="esd,ca,eraseanything",
                   help="comma-separated: esd, ca, eraseanything, eraseanything+neighbors, uce, realera")
    p.add_argument("--out", type=Path, default=Path("bench/results/erase"))
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                   help="EraseConfig override for the trained methods, VALUE as JSON (e.g. lambda_beyond=0); repeatable")
    p.add_argument("--no-suppression", action="store_true",
                   help="skip the attention-suppression row (deterministic: the same in every run)")
    add_world_args(p)
    args = p.parse_args()
    start_run(args)
    world = load_world(args)
    rows, ablation_rows = [], []

    def save() -> None:
        atomic_write_text(args.out / "table.json", json.dumps({"rows": rows, "ablation": ablation_rows}, indent=2))
    for name in args.concepts.split(","):
        cs = sandbox_concept_set(name)
        others = others_of(name)
        base = evaluate_erasure(world, name, samples=args.samples, others=others)
        rows.append(row(name, "base model", base, base, 0.0))
        if not args.no_suppression:
            sup = evaluate_erasure(SuppressedWorld(world, name), name, samples=args.samples, others=others)
            rows.append(row(name, "attention suppression", sup, base, 0.0))
        models = {}
        overrides = {"steps": args.steps} if args.steps else {}  # EraseConfig fields for every trained method
        overrides.update(parse_overrides(args.config))
        for method in [m for m in args.methods.split(",") if m]:  # --methods '' runs the ablation only
            t = time.time()
            model = train_method(world, cs, method, overrides)
            seconds = time.time() - t  # training only; the evaluation is not part of an erase's cost
            m = evaluate_erasure(world, name, transformer=model, samples=args.samples, others=others)
            rows.append(row(name, method, m, base, seconds))
            models[method] = model
        prompt = concept_prompt(name, CONCEPTS[name].axis)
        tiles = [render.to_pil(im, 3) for im in world.sample([prompt] * 8, seed=5)]
        for method, model in models.items():
            tiles += [render.to_pil(im, 3) for im in world.sample([prompt] * 8, seed=5, transformer=model)]
        render.grid(tiles, cols=8, row_labels=["base", *models], title=f"'{prompt}' before/after").save(
            args.out / f"grid_{name}.png")
        if name in args.ablation.split(","):
            for label, kw in ABLATION.items():
                t = time.time()
                res = erase(world, cs, EraseConfig(**{**overrides, **kw}))
                seconds = time.time() - t
                m = evaluate_erasure(world, name, transformer=res.model, samples=args.samples, others=others)
                ablation_rows.append(row(name, label, m, base, seconds))
                save()  # readable midway
        save()
    md = markdown(rows, f"Erasure on the sandbox ({args.samples} samples per prompt, "
                        f"{args.steps or EraseConfig().steps} steps, {torch.get_num_threads()} threads; weights "
                        f"{world_name(args)}, sampler {world.sampler.label()})")
    if ablation_rows:
        md += "\n" + markdown(ablation_rows, "Ablation over the loss terms")
    atomic_write_text(args.out / "table.md", md)
    print(md)


if __name__ == "__main__":
    main()
