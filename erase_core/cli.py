"""The command line: ``python -m erase_core {sandbox,inspect,demo} ...``."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("erase_flux")


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (naming the argument) and exit code 2."""

    def error(self, message: str):  # noqa: D401
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be ≥ 1")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{value} must be a finite number > 0")
    return value


def _device(text: str) -> str:
    import torch

    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device; use cpu or cuda (cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: no CUDA device here (torch {torch.__version__}); use cpu")
    return text


WEIGHTS_HELP = ("sandbox weights folder (default: erase_core/sandbox/weights_22k, the step-22,000 world with its own "
                "sampler; erase_core/sandbox/weights is the step-16,000 world of the earlier benchmarks)")
DEVICE_HELP = ("where the models run (e.g. cuda; default cpu); noise comes from CPU generators, so seeds mean the same "
               "on any device")


def _sampler_options(p: argparse.ArgumentParser) -> None:
    """--steps/--cfg/--shift of the sandbox sampler; unset ones come from the weights' sampler.json."""
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="Euler steps of the sampler (default: the weights' sampler.json, else 12)")
    p.add_argument("--cfg", type=_positive_float, default=None,
                   help="classifier-free guidance scale (default: the weights' sampler.json, else 3)")
    p.add_argument("--shift", type=_positive_float, default=None,
                   help="sampler time shift σ' = sσ/(1 + (s − 1)σ), as Flux's; > 1 spends more steps at high noise, "
                        "where shapes are decided (default: the weights' sampler.json, else 1)")


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of step numbers, e.g. 0,4,8") from None


def _block_list(text: str) -> list[str]:
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part.isdigit():
            part = f"double.{part}"
        kind, _, idx = part.partition(".")
        if kind not in ("double", "single") or not idx.isdigit():
            raise argparse.ArgumentTypeError(f"{part!r} is not a block; use double.N or single.N (or N for double.N)")
        out.append(part)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m erase_core", description="Concept erasure for Flux: engine commands.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    sb = sub.add_parser("sandbox", help="the sandbox world: train it, check its quality, generate from it")
    sbs = sb.add_subparsers(dest="action", required=True, parser_class=_Parser)
    t = sbs.add_parser("train", help="train the sandbox world from scratch (seeded; ~45-60 min on 2 cores)")
    t.add_argument("--out", type=Path, required=True, help="folder for the weights (the shipped ones live in "
                   "erase_core/sandbox/weights_22k and erase_core/sandbox/weights)")
    t.add_argument("--seed", type=int, default=0, help="random seed of every stage")
    t.add_argument("--flux-steps", type=_positive_int, default=None, help="denoiser training steps (default 4000)")
    t.add_argument("--t-mean", type=float, default=None,
                   help="logit-normal location of training times (default 0; >0 favours high noise)")
    t.add_argument("--stop-at", type=_positive_int, default=None,
                   help="end this run after this transformer step; the learning-rate schedule still spans "
                        "--flux-steps, and a later run with the same --out resumes")
    t.add_argument("--device", type=_device, default="cpu", help="device of the transformer stage (e.g. cuda); results match a CPU "
                   "run only statistically, and a resume continues a different GPU random stream")
    t.add_argument("--stages", default="tokenizer,autoencoder,classifier,flux",
                   help="comma-separated stages to run (later stages reuse earlier files in --out)")
    c = sbs.add_parser("check", help="the base-model quality bar: concept found in generated samples, per prompt")
    c.add_argument("--weights", type=Path, default=None, help=WEIGHTS_HELP)
    c.add_argument("--samples", type=_positive_int, default=64, help="samples per probe prompt")
    c.add_argument("--concepts", default=None, help="comma-separated concepts (default: all 24)")
    c.add_argument("--out", type=Path, default=None, help="write the table as FILE.md and FILE.json")
    c.add_argument("--seed", type=int, default=1000, help="first sampling seed")
    _sampler_options(c)
    c.add_argument("--device", type=_device, default="cpu", help=DEVICE_HELP)
    g = sbs.add_parser("generate", help="generate a grid of images from prompts")
    g.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several rows)")
    g.add_argument("--n", type=_positive_int, default=8, help="images per prompt")
    g.add_argument("--seed", type=int, default=0, help="first sampling seed")
    _sampler_options(g)
    g.add_argument("--out", type=Path, required=True, help="PNG file for the grid")
    g.add_argument("--weights", type=Path, default=None, help=WEIGHTS_HELP)

    i = sub.add_parser("inspect", help="attention maps of a word while the sandbox generates a prompt")
    i.add_argument("--prompt", required=True, help="the prompt to generate")
    i.add_argument("--word", required=True, help="word or phrase of the prompt whose token columns to capture")
    i.add_argument("--blocks", type=_block_list, default=None,
                   help="blocks to read, e.g. double.0,double.2,single.1 (default: every dual-stream block)")
    i.add_argument("--steps", type=_int_list, default=None, help="sampling steps to show, e.g. 0,4,8 (default all)")
    i.add_argument("--seed", type=int, default=0, help="sampling seed")
    i.add_argument("--suppress", type=float, default=None,
                   help="also suppress the word's columns by this factor in [0, 1) (0 removes them)")
    i.add_argument("--out", type=Path, required=True, help="output folder for inspect.png, mask.png and inspect.json")
    i.add_argument("--weights", type=Path, default=None, help=WEIGHTS_HELP)

    e = sub.add_parser("erase", help="train an erase-LoRA for a concept (on the sandbox world by default)")
    e.add_argument("--concept", required=True, help="the concept word to erase (a sandbox concept or alias)")
    e.add_argument("--method", choices=("eraseanything", "eraseanything+neighbors", "esd", "ca", "uce", "realera"),
                   default="eraseanything",
                   help="eraseanything (bi-level, default), eraseanything+neighbors (with RealEra's mined neighbours "
                        "and beyond-concept samples), esd (ESD loss only), ca (concept ablation to an anchor), "
                        "uce (closed-form text K/V edit) or realera (closed form with neighbours + noise alignment)")
    e.add_argument("--steps", type=_positive_int, default=None, help="outer training steps (default 200)")
    e.add_argument("--seed", type=int, default=0, help="random seed (training is deterministic under it)")
    e.add_argument("--out", type=Path, required=True, help="LoRA file to write (.safetensors)")
    e.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    e.add_argument("--weights", type=Path, default=None, help=WEIGHTS_HELP)
    e.add_argument("--device", type=_device, default="cpu", help=DEVICE_HELP)

    v = sub.add_parser("evaluate", help="Acc_e / Acc_ir / Acc_g / H_o of an erase-LoRA on the sandbox")
    v.add_argument("--lora", type=Path, default=None, help="LoRA file (omit to evaluate the base model)")
    v.add_argument("--concept", required=True, help="the erased concept")
    v.add_argument("--samples", type=_positive_int, default=64, help="samples per prompt")
    v.add_argument("--json", action="store_true", help="print the metrics as JSON")
    v.add_argument("--weights", type=Path, default=None, help=WEIGHTS_HELP)
    v.add_argument("--device", type=_device, default="cpu", help=DEVICE_HELP)

    mg = sub.add_parser("merge", help="merge several erase-LoRAs into one (normalized, sum, concat, closed_form, "
                                      "distill)")
    mg.add_argument("loras", type=Path, nargs="+", help="LoRA files to merge (.safetensors, same base model)")
    mg.add_argument("--weights", type=float, nargs="+", default=None,
                    help="one weight per LoRA, in order (default 1 each; 'normalized' rescales them to sum to 1)")
    mg.add_argument("--mode", choices=("normalized", "sum", "concat", "closed_form", "distill"), default="concat",
                    help="normalized: Eq. 12 (diluted); sum: weighted sum at the input rank; concat: exact sum, "
                         "ranks stacked (default); closed_form: solved per module on concept/preserve inputs; "
                         "distill: closed_form, then trained through the sandbox model to act like each LoRA on its "
                         "concept and like the base on the preserved concepts (best on the sandbox: docs)")
    mg.add_argument("--rank", type=_positive_int, default=None, help="refactor the merged LoRA to this rank (SVD)")
    mg.add_argument("--preserve", nargs="*", default=None,
                    help="closed_form/distill: concepts to keep (default: every sandbox concept not being merged)")
    mg.add_argument("--preserve-weight", type=float, default=1000.0,
                    help="closed_form/distill: weight λ of the closed form's preserve term (default 1000, as the node)")
    mg.add_argument("--distill-steps", type=_positive_int, default=None,
                    help="distill: training steps (default: DistillConfig's, 1500)")
    mg.add_argument("--distill-batch", type=_positive_int, default=None,
                    help="distill: rows per step from the LoRAs' prompts, and as many preserved (default 16)")
    mg.add_argument("--distill-images", type=_positive_int, default=None,
                    help="distill: images sampled per LoRA (half base, half LoRA; 4× for the preserved concepts; "
                         "default 64)")
    mg.add_argument("--distill-noisings", type=_positive_int, default=None,
                    help="distill: training rows per sampled image, each noised at its own time (default: "
                         "DistillConfig's, 8)")
    mg.add_argument("--distill-balance", choices=("uniform", "relative", "adaptive"), default=None,
                    help="distill: how the LoRAs share the teacher term: relative (default; each LoRA's error over how "
                         "far it moves the base), uniform (every row alike) or adaptive (relative, lagging LoRAs "
                         "weighted up)")
    mg.add_argument("--distill-guided", action=argparse.BooleanOptionalAction, default=None,
                    help="distill: fit each teacher's velocity under the sampler's classifier-free guidance with the "
                         "base's unconditional branch (DistillConfig.guided_targets; no effect at guidance 1, as "
                         "Flux-dev samples; default off)")
    mg.add_argument("--out", type=Path, required=True, help="merged LoRA file to write (.safetensors)")
    mg.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    mg.add_argument("--report", type=Path, default=None,
                    help="also write the interference report as REPORT.json and a heatmap REPORT.png")
    mg.add_argument("--evaluate", type=_positive_int, default=None, metavar="SAMPLES",
                    help="sandbox: also measure, per concept, the share of its single-LoRA erasure that survives "
                         "the merge, on this many samples")
    mg.add_argument("--world", type=Path, default=None,
                    help="closed_form/distill: the model's " + WEIGHTS_HELP)

    nb = sub.add_parser("neighbors", help="RealEra neighbour mining of a concept: labelled samples and what the "
                        "base (and an erased) model draws from each")
    nb.add_argument("--concept", required=True, help="the concept word (a sandbox concept or alias)")
    from .neighbours import NeighbourConfig

    nd = NeighbourConfig()
    nb.add_argument("--d1", type=float, default=nd.d1, help="neighbour radius bound, in units of the concept's norm")
    nb.add_argument("--d2", type=float, default=nd.d2, help="beyond-concept radius bound, same units")
    nb.add_argument("--s1", type=float, default=nd.s1, help="neighbours: cos(e, e+η) ≤ S1")
    nb.add_argument("--s2", type=float, default=nd.s2, help="neighbours: cos ≥ S2; beyond-concept: cos < S2")
    nb.add_argument("--m", type=int, default=6, help="number of neighbours")
    nb.add_argument("--n", type=int, default=3, help="number of beyond-concept samples")
    nb.add_argument("--samples", type=_positive_int, default=8, help="images per sample for the rates")
    nb.add_argument("--seed", type=int, default=0, help="mining and sampling seed")
    nb.add_argument("--lora", type=Path, default=None, help="an erase-LoRA: also show what the erased model draws")
    nb.add_argument("--out", type=Path, required=True, help="output folder for neighbors.png and neighbors.json")
    nb.add_argument("--weights", type=Path, default=None, help=WEIGHTS_HELP)

    li = sub.add_parser("lora-info", help="show a LoRA file's metadata, layout and targets as JSON")
    li.add_argument("file", type=Path, help="LoRA file (.safetensors; diffusers, kohya or ComfyUI layout)")

    d = sub.add_parser("demo", help="the README's main job on the sandbox: inspection, suppression and its failures")
    d.add_argument("--out", type=Path, default=Path("out/demo"), help="output folder for images and report.md")
    d.add_argument("--samples", type=_positive_int, default=64, help="samples per prompt for the rates")
    d.add_argument("--weights", type=Path, default=None,
                   help=WEIGHTS_HELP)
    return p


def _cmd_sandbox(args) -> int:
    from .sandbox.pipeline import SandboxWorld

    if args.action == "train":
        from .sandbox.train import SandboxTrainConfig, train_sandbox

        kw = {"seed": args.seed}
        if args.flux_steps:
            kw["flux_steps"] = args.flux_steps
        if args.t_mean is not None:
            kw["t_mean"] = args.t_mean
        if args.stop_at is not None:
            kw["stop_at"] = args.stop_at
        kw["device"] = args.device
        report = train_sandbox(args.out, SandboxTrainConfig(**kw), stages=tuple(args.stages.split(",")))
        print(json.dumps(report, indent=2))
        return 0
    world = SandboxWorld.load(args.weights)
    if args.action in ("check", "generate"):  # the weights' sampler, overridden by what the command names
        args.steps, args.cfg, args.shift = world.sampler.resolve(args.steps, args.cfg, args.shift)
    if args.action == "check":
        world.to(args.device)
        from .sandbox.check import classifier_check, quality_markdown, quality_table

        concepts = [x.strip() for x in args.concepts.split(",")] if args.concepts else None
        from .sandbox.world import concept as lookup

        concepts = [lookup(c).name for c in concepts] if concepts else None
        acc = classifier_check(world)
        results = quality_table(world, samples=args.samples, seed=args.seed, concepts=concepts, steps=args.steps,
                                cfg_scale=args.cfg, shift=args.shift)
        md = quality_markdown(results)
        md = "Classifier held-out clean accuracy: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in acc.items()) + "\n\n" + md
        print(md)
        if args.out:
            from .io import atomic_write_text

            atomic_write_text(args.out.with_suffix(".md"), md + "\n")
            atomic_write_text(args.out.with_suffix(".json"), json.dumps(
                {"classifier_accuracy": acc, "samples": args.samples, "euler_steps": args.steps, "cfg": args.cfg,
                 "shift": args.shift, "seed": args.seed, "device": args.device,
                 "results": [{"concept": r.probe.concept, "kind": r.probe.kind, "prompt": r.probe.prompt,
                              "found": r.found} for r in results]}, indent=2))
        return 0 if all(r.found >= 0.9 for r in results) else 1
    if args.action == "generate":
        from . import render

        tiles, labels = [], []
        for prompt in args.prompt:
            imgs = world.sample([prompt] * args.n, seed=args.seed, steps=args.steps, cfg_scale=args.cfg,
                                shift=args.shift)
            tiles += [render.to_pil(im, 3) for im in imgs]
            verdicts = world.classify(imgs)
            labels += [f"{s}/{c}" for s, c in zip(verdicts["shape"], verdicts["colour"])]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        render.grid(tiles, cols=args.n, labels=labels, row_labels=args.prompt).save(args.out)
        print(f"wrote {args.out}")
        return 0
    raise AssertionError(args.action)


def _cmd_inspect(args) -> int:
    from . import render
    from .inspect import inspect_sandbox, inspection_grid
    from .io import atomic_write_text
    from .sandbox.pipeline import SandboxWorld

    world = SandboxWorld.load(args.weights)
    ins = inspect_sandbox(world, args.prompt, args.word, blocks=args.blocks, steps=args.steps, seed=args.seed,
                          suppress=args.suppress)
    args.out.mkdir(parents=True, exist_ok=True)
    inspection_grid(ins).save(args.out / "inspect.png")
    m = render.mask(ins.word_map()[0], tuple(ins.images.shape[-2:]))
    render.to_pil(m.expand(3, -1, -1), 4).save(args.out / "mask.png")
    atomic_write_text(args.out / "inspect.json", json.dumps(ins.to_json(), indent=2))
    print(json.dumps({"attention_mass": ins.mass(), "tokens": ins.tokens, "out": str(args.out)}))
    return 0


def _cmd_neighbors(args) -> int:
    import copy

    from .io import atomic_write_text
    from .lora import apply_lora
    from .neighbour_preview import preview, preview_grid
    from .neighbours import NeighbourConfig
    from .sandbox.pipeline import SandboxWorld
    from .sandbox.world import concept as lookup

    cfg = NeighbourConfig(d1=args.d1, d2=args.d2, s1=args.s1, s2=args.s2, m=args.m, n=args.n, seed=args.seed)
    world = SandboxWorld.load(args.weights)
    name = lookup(args.concept).name
    erased = apply_lora(copy.deepcopy(world.transformer), args.lora) if args.lora else None
    rows = preview(world, name, cfg, erased=erased, samples=args.samples, seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    preview_grid(rows, name).save(args.out / "neighbors.png")
    data = [{k: v for k, v in vars(r).items() if k != "images"} for r in rows]
    atomic_write_text(args.out / "neighbors.json", json.dumps({"concept": name, "config": vars(cfg), "rows": data},
                                                              indent=2, default=str))
    print(json.dumps({"out": str(args.out), "rows": [{k: r[k] for k in ("kind", "distance", "base_rate",
                                                                        "erased_rate")} for r in data]}))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        if args.command == "sandbox":
            return _cmd_sandbox(args)
        if args.command == "inspect":
            return _cmd_inspect(args)
        if args.command in ("erase", "evaluate"):
            from .cli_erase import run

            return run(args)
        if args.command == "merge":
            from .cli_merge import run as run_merge

            return run_merge(args)
        if args.command == "neighbors":
            return _cmd_neighbors(args)
        if args.command == "lora-info":
            from .lora_file import describe, read_lora_file

            print(json.dumps(describe(read_lora_file(args.file, allow_unknown=True)), indent=2, default=str))
            return 0
        if args.command == "demo":
            from .demo import run_demo

            report = run_demo(args.out, samples=args.samples, weights=args.weights)
            print(f"demo report: {report}")
            return 0
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"python -m erase_core {args.command}: error: {exc}", file=sys.stderr)
        return 2
    raise AssertionError(args.command)
