"""Prompts of the sandbox world: training prompts with noise, and the fixed probe prompts of each concept."""
from __future__ import annotations

import random
from dataclasses import dataclass

from .world import (ASSOCIATED, AXES, COLOURS, CONCEPTS, FILLERS, NONSENSE, PLACEMENT_LEADS, PLACEMENTS, SHAPES,
                    Scene, random_scene)

_VOWELS = "aeiou"


def misspell(word: str, rng: random.Random) -> str:
    """One plausible typo of a word: swap, drop, double or substitute a letter (never the first letter)."""
    if len(word) < 4:
        return word + word[-1]
    i = rng.randrange(1, len(word) - 1)
    op = rng.randrange(4)
    if op == 0:
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if op == 1:
        return word[:i] + word[i + 1:]
    if op == 2:
        return word[:i] + word[i] + word[i:]
    pool = _VOWELS if word[i] in _VOWELS else "bcdfgklmnprst"
    return word[:i] + rng.choice([c for c in pool if c != word[i]]) + word[i + 1:]


@dataclass(frozen=True)
class NoiseConfig:
    """How training prompts are obfuscated (probabilities per prompt or per word)."""

    mention: float = 0.75  # each attribute is named with this probability
    synonym: float = 0.4  # a named attribute uses a synonym
    typo: float = 0.12  # a named attribute word is misspelled
    shuffle: float = 0.3  # the prompt's words are shuffled
    repeat: float = 0.06  # a named word is repeated
    affix: float = 0.06  # a nonsense word is added before or after
    associated: float = 0.12  # an associated prompt replaces the shape (and colour) words


def _word(name: str, table: dict[str, tuple[str, ...]], rng: random.Random, noise: NoiseConfig) -> str:
    word = rng.choice(table[name]) if rng.random() < noise.synonym else name
    return misspell(word, rng) if rng.random() < noise.typo else word


def training_example(rng: random.Random, noise: NoiseConfig = NoiseConfig()) -> tuple[str, Scene]:
    """One (prompt, scene) pair; unnamed attributes are drawn at random, so the model learns the marginals."""
    words: list[str] = []
    if rng.random() < noise.associated:
        prompt_words = rng.choice(list(ASSOCIATED))
        shape, colour = ASSOCIATED[prompt_words]
        scene = random_scene(rng, shape=shape, colour=colour)
        words = prompt_words.split()
        if colour is None and rng.random() < noise.mention:
            words.insert(len(words) - 1, _word(scene.colour, COLOURS, rng, noise))
    else:
        scene = random_scene(rng)
        if rng.random() < noise.mention:
            words.append(_word(scene.colour, COLOURS, rng, noise))
        shape_named = rng.random() < noise.mention
        words.append(_word(scene.shape, SHAPES, rng, noise) if shape_named else rng.choice(FILLERS))
        words.insert(0, "a")
    if scene.placement != "center" and rng.random() < noise.mention:
        words += [*rng.choice(PLACEMENT_LEADS).split(), _word(scene.placement, PLACEMENTS, rng, noise)]
    elif scene.placement == "center" and rng.random() < 0.3:
        words += ["in", "the", rng.choice(("center", "middle"))]
    if rng.random() < noise.repeat:
        i = rng.randrange(len(words))
        words.insert(i, words[i])
    if rng.random() < noise.affix:
        junk = rng.choice(NONSENSE)
        words = [junk, *words] if rng.random() < 0.5 else [*words, junk]
    if rng.random() < noise.shuffle:
        rng.shuffle(words)
    return " ".join(words), scene


def concept_prompt(alias: str, axis: str) -> str:
    """The plain prompt that names one concept (by its name or an alias) and nothing else."""
    if axis == "shape":
        return f"a {alias}"
    if axis == "colour":
        return f"a {alias} shape"
    return f"a shape in the {alias}"


@dataclass(frozen=True)
class ProbePrompt:
    """A prompt used to measure whether the model draws a concept."""

    concept: str
    kind: str  # "name" | "synonym" | "associated"
    prompt: str


def probe_prompts(concepts: list[str] | None = None) -> list[ProbePrompt]:
    """For each concept: its plain prompt, one per synonym, and one per associated prompt."""
    out: list[ProbePrompt] = []
    for name in concepts or list(CONCEPTS):
        c = CONCEPTS[name]
        out.append(ProbePrompt(name, "name", concept_prompt(name, c.axis)))
        out += [ProbePrompt(name, "synonym", concept_prompt(s, c.axis)) for s in c.synonyms]
        out += [ProbePrompt(name, "associated", a) for a in c.associated]
    return out


def corpus(n: int, seed: int = 0) -> list[str]:
    """Prompts for training the tokenizer: noisy training prompts plus every clean alias."""
    rng = random.Random(seed)
    lines = [training_example(rng)[0] for _ in range(n)]
    for c in CONCEPTS.values():
        lines += [concept_prompt(a, c.axis) for a in c.aliases] * 20
    lines += list(ASSOCIATED) * 20
    lines += [f"a {f} in the center" for f in FILLERS]
    return lines


def axis_of(name: str) -> str:
    for axis, names in AXES.items():
        if name in names:
            return axis
    raise ValueError(f"{name!r} is on no axis")
