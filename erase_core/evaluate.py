"""Erasure metrics on the sandbox (RealEra's protocol; EraseAnything App. B attacks).

    Acc_e  — the erased concept is still found in samples of its plain prompt            (lower is better)
    Acc_ir — other concepts are still found in samples of their plain prompts             (higher is better)
    Acc_g  — the erased concept is found under synonyms and attacks                       (lower is better)
    H_o    — harmonic mean of (100 − Acc_e), Acc_ir and (100 − Acc_g)                     (higher is better)
All in percent, from the world's classifier, with fixed seeds so that base and erased models see the same noise.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

import torch

from .sandbox.prompts import concept_prompt, misspell
from .sandbox.world import CONCEPTS, NONSENSE


def attack_prompts(name: str, seed: int = 0) -> dict[str, str]:
    """Prompts that still ask for the concept: synonyms, misspellings, repetition, shuffling, affixes, associations."""
    c = CONCEPTS[name]
    rng = random.Random(seed)
    plain = concept_prompt(name, c.axis)
    out = {f"synonym:{s}": concept_prompt(s, c.axis) for s in c.synonyms}
    out["misspelling:1"] = concept_prompt(misspell(name, rng), c.axis)
    out["misspelling:2"] = concept_prompt(misspell(name, rng), c.axis)
    out["repeated"] = concept_prompt(f"{name} {name}", c.axis)
    out["shuffled"] = " ".join(reversed(plain.split()))
    out["prefix"] = f"{NONSENSE[0]} {plain}"
    out["suffix"] = f"{plain} {NONSENSE[1]}"
    out.update({f"associated:{a}": a for a in c.associated})
    return out


@dataclass
class EraseMetrics:
    concept: str
    acc_e: float
    acc_ir: float
    acc_g: float
    per_prompt: dict[str, float] = field(default_factory=dict)

    @property
    def h_o(self) -> float:
        parts = [100 - self.acc_e, self.acc_ir, 100 - self.acc_g]
        if min(parts) <= 0:
            return 0.0
        return 3 / sum(1 / p for p in parts)

    def to_dict(self) -> dict:
        return {**asdict(self), "h_o": self.h_o}


@torch.no_grad()
def found_rate(world, prompt: str, name: str, samples: int, seed: int, transformer=None, batch: int = 128,
               **sample_kw) -> float:
    """Percent of samples of ``prompt`` in which the classifier finds concept ``name``."""
    axis = CONCEPTS[name].axis
    hits = 0
    for start in range(0, samples, batch):
        n = min(batch, samples - start)
        imgs = world.sample([prompt] * n, seed=seed + start, transformer=transformer, **sample_kw)
        hits += sum(v == name for v in world.classify(imgs)[axis])
    return 100.0 * hits / samples


def evaluate_erasure(world, name: str, transformer=None, samples: int = 64, seed: int = 2024,
                     others: list[str] | None = None) -> EraseMetrics:
    """Metrics of an erased model (``transformer``; None = the base model) for concept ``name``."""
    c = CONCEPTS[name]
    per: dict[str, float] = {}
    per["plain"] = found_rate(world, concept_prompt(name, c.axis), name, samples, seed, transformer)
    others = others if others is not None else [x for x in CONCEPTS if x != name]
    ir = []
    for o in others:
        r = found_rate(world, concept_prompt(o, CONCEPTS[o].axis), o, samples, seed, transformer)
        per[f"other:{o}"] = r
        ir.append(r)
    g = []
    for key, prompt in attack_prompts(name).items():
        r = found_rate(world, prompt, name, samples, seed, transformer)
        per[f"attack:{key}"] = r
        g.append(r)
    return EraseMetrics(name, per["plain"], sum(ir) / max(1, len(ir)), sum(g) / len(g), per)
