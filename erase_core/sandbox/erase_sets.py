"""Concept sets for erasing a sandbox concept: its prompts, synonym, irrelevant concepts and preserved prompts."""
from __future__ import annotations

import random

from ..concepts import ConceptSet
from .prompts import concept_prompt
from .world import AXES, CONCEPTS, PLACEMENT_LEADS, concept

ANCHORS = {"shape": "shape", "colour": "", "placement": "center"}


def concept_prompts(name: str, n: int = 24, seed: int = 0) -> list[str]:
    """Prompts that name the concept by its canonical word, with the other attributes named at random."""
    c = CONCEPTS[name]
    rng = random.Random(seed)
    out = [concept_prompt(name, c.axis)]
    while len(out) < n:
        shape = name if c.axis == "shape" else rng.choice(["shape", *AXES["shape"]])
        colour = name if c.axis == "colour" else rng.choice(["", *AXES["colour"]])
        placement = name if c.axis == "placement" else rng.choice(["", *AXES["placement"][:-1]])
        words = ["a", colour, shape] if colour else ["a", shape]
        if placement:
            words += [*rng.choice(PLACEMENT_LEADS).split(), placement]
        prompt = " ".join(words)
        if prompt not in out:
            out.append(prompt)
    return out


def sandbox_concept_set(name: str, n_irrelevant: int = 3, seed: int = 0) -> ConceptSet:
    """The erase set of a sandbox concept (the world's own vocabulary serves as WordNet and LLM would).

    Irrelevant concepts are other concepts of the same axis, so that substituting them for the word gives a
    well-formed prompt (the RSC reads each at its own token indices). Preserved prompts are the plain prompts of every other concept on the same axis: the neighbours an erase most
    easily damages.
    """
    c = concept(name)
    rng = random.Random(seed)
    same = [x for x in AXES[c.axis] if x != c.name and x in CONCEPTS]
    irrelevant = rng.sample(same, n_irrelevant)
    preserve = tuple(concept_prompt(x, c.axis) for x in same)
    return ConceptSet(word=c.name, prompts=tuple(concept_prompts(c.name, seed=seed)), synonyms=c.synonyms,
                      irrelevant=tuple(irrelevant), preserve_prompts=preserve, anchor=ANCHORS[c.axis])


def module_inputs(world, name: str, modules: list[str], n_prompts: int = 8, times=(0.3, 0.6, 0.9),
                  seed: int = 0):
    """Per module, the rows it sees at the concept word's tokens over base-model samples of the concept's
    prompts noised to ``times`` (the inputs of closed-form edits and merges)."""
    from ..kv_edit import word_module_inputs

    return word_module_inputs(world, name, concept_prompts(name, n=n_prompts, seed=seed), modules, times, seed)
