"""The base-model quality bar: for every probe prompt, how often the classifier finds the prompt's concept."""
from __future__ import annotations

import logging
from dataclasses import dataclass


from .pipeline import SandboxWorld
from .prompts import ProbePrompt, probe_prompts
from .train import classifier_accuracy
from .world import CONCEPTS

log = logging.getLogger("erase_flux.sandbox")


@dataclass(frozen=True)
class ProbeResult:
    probe: ProbePrompt
    found: float  # fraction of samples in which the classifier finds the concept
    samples: int


def concept_rate(world: SandboxWorld, prompt: str, concept: str, samples: int, seed: int, **sample_kw) -> float:
    """Fraction of ``samples`` images of ``prompt`` in which the classifier finds ``concept`` on its axis."""
    from ..evaluate import found_rate

    return found_rate(world, prompt, concept, samples, seed, **sample_kw) / 100.0


def quality_table(world: SandboxWorld, samples: int = 64, seed: int = 1000, concepts: list[str] | None = None,
                  progress=None, **sample_kw) -> list[ProbeResult]:
    """The quality bar over every probe prompt (name, synonyms, associated prompts) of the chosen concepts."""
    probes = probe_prompts(concepts)
    out = []
    for i, p in enumerate(probes):
        rate = concept_rate(world, p.prompt, p.concept, samples, seed, **sample_kw)
        out.append(ProbeResult(p, rate, samples))
        log.info("%-10s %-10s %-28r %5.1f%%", p.concept, p.kind, p.prompt, 100 * rate)
        if progress:
            progress(i + 1, len(probes))
    return out


def quality_markdown(results: list[ProbeResult], bar: float = 0.9) -> str:
    lines = ["| concept | category | prompt kind | prompt | found |", "|---|---|---|---|---|"]
    for r in results:
        mark = "" if r.found >= bar else " ✗"
        lines.append(f"| {r.probe.concept} | {CONCEPTS[r.probe.concept].category} | {r.probe.kind} | "
                     f"`{r.probe.prompt}` | {100 * r.found:.1f}%{mark} |")
    worst = min(results, key=lambda r: r.found)
    passed = sum(r.found >= bar for r in results)
    lines.append("")
    lines.append(f"{passed}/{len(results)} probe prompts at ≥ {100 * bar:.0f}% ({results[0].samples} samples each); "
                 f"lowest: `{worst.probe.prompt}` {100 * worst.found:.1f}%")
    return "\n".join(lines)


def classifier_check(world: SandboxWorld, seed: int = 4242) -> dict[str, float]:
    """Held-out clean accuracy of the shipped classifier per axis."""
    return classifier_accuracy(world.classifier, seed=seed)

