"""Merging many erase-LoRAs on the sandbox: erase 20 concepts one LoRA each, merge them with every mode, evaluate
every concept; dilution of `normalized` against the number of LoRAs; merge time at Flux-dev geometry.

Usage: python bench/merge_table.py [--samples 32] [--out bench/results/merge] [--threads 2]
       (every mode; `distill` trains through the sandbox model, DistillConfig's defaults, ~4 min per merge on 1 core)
       python bench/merge_table.py --timing-only     # 20 random LoRAs of Flux-dev geometry, every mode, timed
       python bench/merge_table.py --markdown-only   # table.md again from table.json
       python bench/merge_table.py --update distill  # re-measure only these modes (rows and sweep) in OUT/table.json,
                                                     # against its stored base and single-LoRA rates
LoRAs are cached in OUT/loras (delete them to retrain). Writes table.md, table.json, dilution.png, interference.png.
"""
import argparse
import dataclasses
import json
import logging
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from erase_core import render  # noqa: E402
from erase_core.cli_merge import closed_form_inputs, distill_prompts  # noqa: E402
from erase_core.evaluate import found_rate  # noqa: E402
from erase_core.io import atomic_write_text  # noqa: E402
from erase_core.lora import apply_lora, save_lora  # noqa: E402
from erase_core.lora_file import LoraFile, LoraModule, model_fingerprint, read_lora_file  # noqa: E402
from erase_core.merge import MODES, MergeConfig, interference, interference_summary, merge  # noqa: E402
from erase_core.merge_distill import DistillConfig, distill_merge  # noqa: E402
from erase_core.sandbox.erase_sets import sandbox_concept_set  # noqa: E402
from erase_core.sandbox.pipeline import SamplerDefaults  # noqa: E402
from erase_core.sandbox.prompts import concept_prompt  # noqa: E402
from erase_core.sandbox.world import CONCEPTS  # noqa: E402
from erase_core.train import EraseConfig, erase  # noqa: E402
from bench.world_args import add_world_args, load_world, start_run, world_name  # noqa: E402

log = logging.getLogger("bench")
KEEP = ("moon", "green", "north", "southeast")  # never erased: the Acc_ir witnesses
COMPOSITE = ("a green moon in the north", "a green moon at the southeast")  # held out from every merge mode
_AXES = [[c for c in CONCEPTS if CONCEPTS[c].axis == a and c not in KEEP] for a in ("shape", "colour", "placement")]
#: the 20 erased concepts, axes interleaved so that every prefix (3, 5, 10 LoRAs) mixes categories
ORDER = tuple(c for i in range(8) for axis in _AXES for c in axis[i:i + 1])


def rate(world, name, samples, model=None):
    return found_rate(world, concept_prompt(name, CONCEPTS[name].axis), name, samples, seed=4242, transformer=model)


def with_lora(world, lf):
    import copy

    return apply_lora(copy.deepcopy(world.transformer), lf)


def flux_dev_timing(n: int = 20, rank: int = 16) -> dict:
    """Merge n random LoRAs of Flux-dev geometry (19 dual blocks, hidden 3072, add_q/add_k) with every mode."""
    g = torch.Generator().manual_seed(0)
    keys = [f"transformer_blocks.{b}.attn.{t}" for b in range(19) for t in ("add_q_proj", "add_k_proj")]
    loras = [LoraFile({k: LoraModule(torch.randn(rank, 3072, generator=g) * 0.01,
                                     torch.randn(3072, rank, generator=g) * 0.01, float(rank)) for k in keys},
                      {"concept": f"c{i}"}) for i in range(n)]
    inputs = [{k: torch.randn(64, 3072, generator=g) for k in keys} for _ in range(n)]
    preserve = {k: torch.randn(256, 3072, generator=g) for k in keys}
    out = {}
    for mode in MODES:
        t = time.time()
        merge(loras, MergeConfig(mode=mode), inputs if mode == "closed_form" else None,
              preserve if mode == "closed_form" else None)
        out[mode] = time.time() - t
    t = time.time()
    interference(loras)
    out["interference report"] = time.time() - t
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--steps", type=int, default=None, help="erase steps per concept (default: EraseConfig's)")
    p.add_argument("--out", type=Path, default=Path("bench/results/merge"))
    p.add_argument("--timing-only", action="store_true")
    p.add_argument("--markdown-only", action="store_true", help="re-render OUT/table.md from OUT/table.json")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--update", default=None, help="comma-separated modes to re-measure into an existing OUT/table.json")
    p.add_argument("--sweep-modes", default="normalized,concat,distill",
                   help="modes measured at 3 / 5 / 10 / 20 LoRAs (the dilution plot; distill costs a distillation each)")
    p.add_argument("--distill-steps", type=int, default=None, help="distill steps (default: DistillConfig's)")
    p.add_argument("--distill-balance", default=None, help="distill balance: uniform, relative or adaptive")
    p.add_argument("--distill-images", type=int, default=None, help="x_0 per LoRA (default: DistillConfig's)")
    p.add_argument("--distill-guided", action="store_true", help="distill with guided_targets (DistillConfig)")
    p.add_argument("--distill-seed", type=int, default=None, help="distill seed (default: DistillConfig's, 0)")
    p.add_argument("--distill-noisings", type=int, default=None,
                   help="training rows per sampled image (default: DistillConfig's)")
    add_world_args(p)
    args = p.parse_args()
    start_run(args)
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    if args.markdown_only:
        write_markdown(json.loads((args.out / "table.json").read_text()), args.out)
        return
    if args.timing_only:  # run it on an otherwise idle machine
        timing = {"machine": machine, "seconds": flux_dev_timing()}
        atomic_write_text(args.out / "flux_dev_timing.json", json.dumps(timing, indent=2))
        print(json.dumps(timing, indent=2))
        return
    given = {"steps": args.distill_steps, "balance": args.distill_balance, "images": args.distill_images,
             "guided_targets": args.distill_guided or None, "seed": args.distill_seed,
             "noisings": args.distill_noisings}
    distill_cfg = DistillConfig(**{k: v for k, v in given.items() if v is not None})
    world = load_world(args)
    (args.out / "loras").mkdir(exist_ok=True)
    cfg = EraseConfig(**({"steps": args.steps} if args.steps else {}))
    loras, train_s = {}, {}
    for name in ORDER:
        path = args.out / "loras" / f"{name}.safetensors"
        if not path.exists():
            t = time.time()
            res = erase(world, sandbox_concept_set(name), cfg)
            train_s[name] = time.time() - t
            save_lora(res.model, path, {"concept": name, "method": cfg.method, "config": cfg.to_dict()})
        loras[name] = read_lora_file(path)
        if loras[name].meta.get("fingerprint") != model_fingerprint(world.transformer):
            raise SystemExit(f"{path} was trained on another base model (fingerprint "
                             f"{loras[name].meta.get('fingerprint')}); use another --out for these weights")
    prev = _previous(args) if args.update else None
    if prev:
        base, single = prev["base"], prev["single"]
    else:
        base = {c: rate(world, c, args.samples) for c in CONCEPTS}
        single = {c: rate(world, c, args.samples, with_lora(world, loras[c])) for c in ORDER}
    log.info("base %s\nsingle %s", base, single)

    # the kept concepts under their synonyms (distill trains on these; the other modes never see them), and in
    # composite prompts that no mode trains on: each concept of the prompt must be found
    synonyms = [(c, concept_prompt(s, CONCEPTS[c].axis)) for c in KEEP for s in CONCEPTS[c].synonyms]
    composite = [(c, p) for p in COMPOSITE for c in KEEP if c in p.split()]

    def total(pairs, model=None):
        return sum(found_rate(world, p, c, args.samples, seed=4242, transformer=model) for c, p in pairs)

    base_synonyms, base_composite = ((prev["base_synonyms"], prev["base_composite"]) if prev
                                     else (total(synonyms), total(composite)))

    def evaluate(names, lf, witnesses=False):
        model = with_lora(world, lf)
        erased = {c: rate(world, c, args.samples, model) for c in names}
        kept = {c: rate(world, c, args.samples, model) for c in KEEP}
        drop = {c: base[c] - erased[c] for c in names}
        share = {c: drop[c] / max(base[c] - single[c], 1e-9) for c in names}
        out = {"acc_e": erased, "kept": kept, "efficacy_share": share,
               "mean_efficacy_share": sum(share.values()) / len(share),
               "min_efficacy_share": min(share.values()),
               "concepts_at_90": sum(v >= 0.9 for v in share.values()),
               "acc_ir_of_base": 100 * sum(kept.values()) / max(sum(base[c] for c in KEEP), 1e-9)}
        if witnesses:
            out["acc_ir_synonyms_of_base"] = 100 * total(synonyms, model) / max(base_synonyms, 1e-9)
            out["acc_ir_composite_of_base"] = 100 * total(composite, model) / max(base_composite, 1e-9)
        return out

    def merged_with(mode: str, names) -> LoraFile:
        files = [loras[c] for c in names]
        if mode not in ("closed_form", "distill"):
            return merge(files, MergeConfig(mode=mode), names=list(names))
        ci, pi = closed_form_inputs(world, files, list(KEEP))
        if mode == "closed_form":
            return merge(files, MergeConfig(mode=mode), ci, pi, names=list(names))
        prompts, keep = distill_prompts(files, list(KEEP))
        merged, history = distill_merge(world, files, MergeConfig(mode=mode), prompts, keep, ci, pi, distill_cfg,
                                        names=list(names))
        log.info("distill of %d: losses first %s, last %s", len(names), history[0], history[-1])
        return merged

    results, sweep = (prev["modes"], prev["sweep"]) if prev else ({}, {})
    modes = args.update.split(",") if args.update else MODES
    all_files = [loras[c] for c in ORDER]
    for mode in modes:
        t = time.time()
        merged = merged_with(mode, ORDER)
        results[mode] = {"merge_seconds": time.time() - t, **evaluate(ORDER, merged, witnesses=True),
                         "preserve_weight": MergeConfig().preserve_weight if mode in ("closed_form", "distill")
                         else None}
        log.info("%s: mean share %.2f, Acc_ir %.1f%%", mode, results[mode]["mean_efficacy_share"],
                 results[mode]["acc_ir_of_base"])
    for n in (3, 5, 10, 20):
        names = ORDER[:n]
        for mode in args.sweep_modes.split(","):
            if mode not in modes:
                continue
            if n == 3:
                sweep[mode] = []
            r = results[mode] if n == len(ORDER) else evaluate(names, merged_with(mode, names))
            sweep.setdefault(mode, []).append({"n": n, "mean_efficacy_share": r["mean_efficacy_share"],
                                               "acc_ir_of_base": r["acc_ir_of_base"]})
    cos = interference(all_files)
    summary = interference_summary(cos)
    mean_cos = torch.stack([c.abs() for c in cos.values()]).mean(0)
    render.matrix_image(mean_cos, list(ORDER), "mean |cos| between erase-LoRA deltas").save(args.out / "interference.png")
    render.line_plot({m: [(s["n"], 100 * s["mean_efficacy_share"]) for s in v] for m, v in sweep.items()},
                     "share of single-LoRA erasure kept", "LoRAs merged", "%", ylim=(0, 110)).save(
        args.out / "dilution.png")
    report = {"machine": machine, "weights": world_name(args), "sampler": dataclasses.asdict(world.sampler),
              "samples": args.samples, "erased": list(ORDER), "kept": list(KEEP), "base": base,
              "base_synonyms": base_synonyms, "base_composite": base_composite, "composite_prompts": list(COMPOSITE),
              "distill_config": distill_cfg.to_dict() if "distill" in modes else (prev or {}).get("distill_config"),
              "single": single, "train_seconds": prev["train_seconds"] if prev else train_s, "modes": results,
              "sweep": sweep, "interference": summary,
              "updated": [*(prev or {}).get("updated", []), {"modes": modes, "machine": machine,
                                                          "date": time.strftime("%Y-%m-%d")}] if prev else []}
    atomic_write_text(args.out / "table.json", json.dumps(report, indent=2))
    write_markdown(report, args.out)


def _previous(args) -> dict:
    """The stored table that ``--update`` re-measures modes into (same sample count, known modes)."""
    path = args.out / "table.json"
    if not path.exists():
        raise SystemExit(f"--update needs {path}; run the full benchmark into --out first")
    prev = json.loads(path.read_text())
    if prev["samples"] != args.samples:
        raise SystemExit(f"--samples {args.samples} differs from the stored table's {prev['samples']}; pass "
                         f"--samples {prev['samples']}")
    unknown = [m for m in args.update.split(",") if m not in MODES]
    if unknown:
        raise SystemExit(f"--update: unknown mode {unknown[0]!r}; choose from {', '.join(MODES)}")
    return prev


def write_markdown(report: dict, out: Path) -> None:
    """table.md from a table.json report (``--markdown-only`` re-renders it without measuring again)."""
    results, sweep, n_erased = report["modes"], report["sweep"], len(report["erased"])
    world = report.get("weights", "weights (step 16,000)")  # tables before 2026-11-23 do not name it
    sampler = SamplerDefaults(**report.get("sampler", {}))  # older tables: the step-16,000 world's defaults
    md = [f"Merging {n_erased} erase-LoRAs on the sandbox ({report['samples']} samples per prompt; {report['machine']}; "
          f"world {world}, sampler {sampler.label()}).", "",
          "| mode | mean share of single-LoRA erasure kept | concepts ≥ 90 % kept | worst concept | Acc_ir (% of base) "
          "| Acc_ir, synonyms (% of base) | Acc_ir, composite prompts (% of base) | merge s |",
          "|---|---|---|---|---|---|---|---|"]
    for mode, r in results.items():
        worst = min(r["efficacy_share"], key=r["efficacy_share"].get)
        label = mode
        if mode == "closed_form":
            label = f"closed_form (λ = {r['preserve_weight']:g})"
        elif mode == "distill":
            dc = report.get("distill_config") or {}
            guided = ", guided targets" if dc.get("guided_targets") else ""
            n = dc.get("noisings", 1)
            noisings = f", {n} noising{'s' if n != 1 else ''} per image"
            how = f"{dc['steps']} steps{noisings}, {dc['balance']} balance{guided}; " if dc else ""
            label = f"distill ({how}from closed_form λ = {r['preserve_weight']:g})"
        md.append(f"| {label} | {100 * r['mean_efficacy_share']:.0f}% | {r['concepts_at_90']} / {n_erased} "
                  f"| {worst} {100 * r['efficacy_share'][worst]:.0f}% | {r['acc_ir_of_base']:.0f}% "
                  f"| {r['acc_ir_synonyms_of_base']:.0f}% | {r['acc_ir_composite_of_base']:.0f}% "
                  f"| {r['merge_seconds']:.1f} |")
    md += ["", "| LoRAs merged | " + " | ".join(sweep) + " |", "|---|" + "---|" * len(sweep)]
    for i, n in enumerate(s["n"] for s in next(iter(sweep.values()))):
        md.append(f"| {n} | " + " | ".join(f"{100 * sweep[m][i]['mean_efficacy_share']:.0f}% "
                                           f"(Acc_ir {sweep[m][i]['acc_ir_of_base']:.0f}%)" for m in sweep) + " |")
    atomic_write_text(out / "table.md", "\n".join(md) + "\n")
    print("\n".join(md))

if __name__ == "__main__":
    main()
