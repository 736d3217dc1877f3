"""The README's main job on the sandbox: what the world draws, where a word's attention goes, and why deleting a
word's attention columns (the deterministic erasure) is not an eraser: it works on the plain word and fails on a
synonym, a misspelling, or other obfuscations that the base model still understands (EraseAnything Sec. 3, App. B).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import evaluate, render
from .flux.attention import AttentionPatch
from .inspect import inspect_sandbox, inspection_grid
from .io import atomic_write_text
from .sandbox.pipeline import SandboxWorld, weights_name
from .sandbox.prompts import concept_prompt
from .sandbox.world import CONCEPTS
from .tokens import word_token_indices

log = logging.getLogger("erase_flux.demo")

DEMO_CONCEPTS = ("red", "west", "star")


@dataclass(frozen=True)
class AttackPrompt:
    kind: str
    prompt: str


def attack_prompts(concept: str, seed: int = 0) -> list[AttackPrompt]:
    """The plain prompt of a concept and one of each obfuscation that still asks for it (from the evaluator)."""
    c = CONCEPTS[concept]
    attacks = evaluate.attack_prompts(concept, seed)
    picks = {"synonym": f"synonym:{c.synonyms[0]}", "misspelling": "misspelling:1", "repeated word": "repeated",
             "shuffled words": "shuffled", "nonsense prefix": "prefix"}
    out = [AttackPrompt("plain", concept_prompt(c.name, c.axis))]
    out += [AttackPrompt(kind, attacks[key]) for kind, key in picks.items()]
    out += [AttackPrompt("associated", a) for a in c.associated[:1]]
    return out


def suppressed_rate(world: SandboxWorld, prompt: str, word: str, samples: int, seed: int,
                    blocks: list[str], rows: str = "all") -> tuple[float, list[int], torch.Tensor]:
    """Rate at which the concept is drawn when ``word``'s columns are removed (if the word is in the prompt)."""
    try:
        idx = word_token_indices(world.tokenizer, prompt, word)
    except ValueError:
        idx = []  # the word is not in the prompt: the deterministic erasure has nothing to delete
    if idx:
        with AttentionPatch(world.transformer, idx, capture=False, suppress=0.0, blocks=[],
                            suppress_blocks=blocks, suppress_rows=rows) as patch:
            imgs = world.sample([prompt] * samples, seed=seed, patch=patch)
    else:
        imgs = world.sample([prompt] * samples, seed=seed)
    axis = CONCEPTS[word].axis
    rate = sum(v == word for v in world.classify(imgs)[axis]) / samples
    return rate, idx, imgs


def all_blocks(world: SandboxWorld) -> list[str]:
    tr = world.transformer
    return [f"double.{i}" for i in range(len(tr.transformer_blocks))] + \
           [f"single.{i}" for i in range(len(tr.single_transformer_blocks))]


def learned_erasure(world: SandboxWorld, concept: str, out: Path, samples: int, seed: int,
                    suppression: dict) -> list[str]:
    """Train the EraseAnything LoRA for ``concept`` and compare it with suppression on the same attack prompts."""
    from .lora import save_lora
    from .sandbox.erase_sets import sandbox_concept_set
    from .train import EraseConfig, erase

    cfg = EraseConfig()
    t = time.time()
    res = erase(world, sandbox_concept_set(concept), cfg)
    seconds = time.time() - t
    save_lora(res.model, out / f"erase_{concept}.safetensors", {"concept": concept, "method": cfg.method,
                                                                 "config": cfg.to_dict()}, overwrite=True)
    lines = [f"## Learned erasure of `{concept}` (EraseAnything, {cfg.steps} steps, {seconds:.0f} s)", "",
             f"LoRA: `erase_{concept}.safetensors`. Rate = share of {samples} samples with the concept.", "",
             "| attack | prompt | base | suppressed | erase-LoRA |", "|---|---|---|---|---|"]
    tiles, row_labels, rows = [], [], {}
    for attack in attack_prompts(concept):
        imgs = world.sample([attack.prompt] * samples, seed=seed, transformer=res.model)
        axis = CONCEPTS[concept].axis
        rate = sum(v == concept for v in world.classify(imgs)[axis]) / samples
        sup = suppression.get(f"{concept}/{attack.kind}", {})
        rows[attack.kind] = {"prompt": attack.prompt, "erased": rate, **sup}
        lines.append(f"| {attack.kind} | `{attack.prompt}` | {100 * sup.get('base', float('nan')):.0f}% | "
                     f"{100 * sup.get('suppressed', float('nan')):.0f}% | {100 * rate:.0f}% |")
        base_imgs = world.sample([attack.prompt] * 6, seed=seed)
        tiles += [render.to_pil(im, 2) for im in base_imgs] + [render.to_pil(im, 2) for im in imgs[:6]]
        row_labels.append(attack.kind)
    neighbours = [x for x in CONCEPTS if CONCEPTS[x].axis == CONCEPTS[concept].axis and x != concept]
    kept = {x: evaluate.found_rate(world, concept_prompt(x, CONCEPTS[x].axis), x, samples, seed,
                                   transformer=res.model) for x in neighbours}
    lines += ["", "Neighbours kept (same axis, erase-LoRA on): " +
              ", ".join(f"{x} {v:.0f}%" for x, v in kept.items()), ""]
    render.grid(tiles, cols=12, row_labels=row_labels,
                title=f"'{concept}': 6 base samples | 6 with the erase-LoRA").save(out / f"erase_{concept}.png")
    losses = {}
    for entry in res.history:
        for k, v in entry.losses.items():
            losses.setdefault(k, []).append((entry.step, v))
    render.line_plot(losses, f"erase '{concept}': losses per step", "step", "loss").save(out / f"losses_{concept}.png")
    atomic_write_text(out / "erasure.json", json.dumps({"concept": concept, "seconds": seconds, "prompts": rows,
                                                         "neighbours": kept}, indent=2))
    return lines + [f"![erase {concept}](erase_{concept}.png)", "", f"![losses](losses_{concept}.png)", ""]


def spread_steps(steps: int, k: int = 5) -> list[int]:
    """``k`` sampling-step indices spread evenly from the first step to the last of a ``steps``-step sampler."""
    return sorted({round(i * (steps - 1) / (k - 1)) for i in range(k)})


def run_demo(out: str | Path, samples: int = 64, seed: int = 7, concepts=DEMO_CONCEPTS,
             learned: str | None = "red", weights: str | Path | None = None) -> Path:
    """Write the demo's images and ``report.md`` into ``out``; returns the report's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    world = SandboxWorld.load(weights)
    sampler = world.sampler
    lines = ["# Sandbox demo: attention inspection and deterministic suppression", "",
             f"Sandbox weights: `{weights_name(weights)}`; sampler: {sampler.label()} (Euler).", ""]

    # 1. what the world draws
    tiles, rows = [], []
    for name, c in CONCEPTS.items():
        prompt = concept_prompt(name, c.axis)
        tiles += [render.to_pil(im, 2) for im in world.sample([prompt] * 8, seed=seed)]
        rows.append(prompt)
    render.grid(tiles, cols=8, row_labels=rows, title="The sandbox world: 8 samples per concept prompt").save(
        out / "sandbox_grid.png")
    lines += ["## The sandbox world", "", "![sandbox](sandbox_grid.png)", ""]

    # 2. where the words look
    lines += ["## Attention inspection", ""]
    for prompt, word in (("a red circle in the west", "red"), ("a red circle in the west", "circle"),
                         ("a red circle in the west", "west")):
        ins = inspect_sandbox(world, prompt, word, seed=seed, steps=spread_steps(sampler.steps))
        name = f"inspect_{word}.png"
        inspection_grid(ins).save(out / name)
        atomic_write_text(out / f"inspect_{word}.json", json.dumps(ins.to_json(), indent=2))
        lines += [f"- `{word}` in `{prompt}`: tokens {ins.tokens}, attention mass {ins.mass():.3f}", "",
                  f"  ![{word}]({name})", ""]

    # 3. deterministic suppression and where it fails
    blocks = all_blocks(world)
    lines += ["## Deterministic attention suppression (the word's columns removed in every block)", "",
              f"Rate = share of {samples} samples in which the classifier finds the concept.", ""]
    summary = {}
    for concept in concepts:
        lines += [f"### `{concept}`", "", "| attack | prompt | suppressed tokens | base | suppressed |",
                  "|---|---|---|---|---|"]
        tiles, row_labels = [], []
        for attack in attack_prompts(concept):
            imgs = world.sample([attack.prompt] * samples, seed=seed)
            axis = CONCEPTS[concept].axis
            base = sum(v == concept for v in world.classify(imgs)[axis]) / samples
            sup, idx, sup_imgs = suppressed_rate(world, attack.prompt, concept, samples, seed, blocks)
            summary[f"{concept}/{attack.kind}"] = {"prompt": attack.prompt, "base": base, "suppressed": sup,
                                                   "suppressed_tokens": idx}
            lines.append(f"| {attack.kind} | `{attack.prompt}` | {len(idx) or 'none (word absent)'} | "
                         f"{100 * base:.0f}% | {100 * sup:.0f}% |")
            tiles += [render.to_pil(im, 2) for im in imgs[:6]] + [render.to_pil(im, 2) for im in sup_imgs[:6]]
            row_labels.append(attack.kind)
        render.grid(tiles, cols=12, row_labels=row_labels,
                    title=f"'{concept}': 6 base samples | 6 with '{concept}' columns suppressed").save(
            out / f"suppress_{concept}.png")
        lines += ["", f"![suppression of {concept}](suppress_{concept}.png)", ""]
    atomic_write_text(out / "suppression.json", json.dumps(summary, indent=2))

    # 4. learned erasure beats the attacks that beat suppression
    if learned:
        lines += learned_erasure(world, learned, out, samples, seed, summary)
    lines += [f"Ran in {time.time() - t0:.0f} s."]
    report = atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    log.info("demo written to %s", out)
    return report
