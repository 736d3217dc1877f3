"""What an erase is trained on: the concept's prompts, a synonym, irrelevant concepts, preserved prompts.

Offline by default: synonyms come from NLTK WordNet (Debian's copy, see scripts/install_wordnet.py), irrelevant
concepts are picked in three bands of WordNet similarity (EraseAnything App. C: no_relation / far / mid). User lists
always win.
"""
from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass, field

log = logging.getLogger("erase_flux.concepts")


@dataclass(frozen=True)
class ConceptSet:
    """Everything the trainer needs about one concept.

    Attributes:
        word: the erased word or phrase, as it appears in ``prompts``.
        prompts: prompts that contain ``word`` (shuffled and re-indexed every step).
        synonyms: words that mean the concept (the RSC negative; also attack prompts).
        irrelevant: concepts unrelated to it (the RSC positives).
        preserve_prompts: prompts whose images the upper level keeps (L_lora).
        anchor: what the concept is mapped to by CA (replaces ``word`` in a prompt; "" removes it).
    """

    word: str
    prompts: tuple[str, ...]
    synonyms: tuple[str, ...] = ()
    irrelevant: tuple[str, ...] = ()
    preserve_prompts: tuple[str, ...] = ()
    anchor: str = ""
    bands: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not self.word.strip():
            raise ValueError("concept word is empty; give the word to erase, e.g. 'red'")
        missing = [p for p in self.prompts if not re.search(rf"(?<!\w){re.escape(self.word)}(?!\w)", p, re.I)]
        if not self.prompts or missing:
            raise ValueError(f"every concept prompt must contain the word {self.word!r}; "
                             f"{missing[0] if missing else 'no prompts'!r} does not")

    def substitute(self, prompt: str, replacement: str) -> str:
        """``prompt`` with every whole-word occurrence of the concept word replaced."""
        out = re.sub(rf"(?<!\w){re.escape(self.word)}(?!\w)", replacement, prompt, flags=re.I)
        return re.sub(r"\s+", " ", out).strip()


# --- WordNet ---------------------------------------------------------------------------------------------------
def _wordnet():
    try:
        from nltk.corpus import wordnet as wn

        wn.ensure_loaded()
        return wn
    except LookupError as exc:  # never download at run time
        raise RuntimeError("NLTK WordNet is not installed; run `bash scripts/install.sh` (Debian wordnet-base + "
                           "scripts/install_wordnet.py), or pass synonyms/irrelevant concepts explicitly") from exc


def wordnet_synonyms(word: str, limit: int = 8) -> list[str]:
    """Lemmas of the word's first synsets (most frequent senses first), without the word itself."""
    wn = _wordnet()
    key = word.strip().lower().replace(" ", "_")
    out: list[str] = []
    for syn in wn.synsets(key)[:3]:
        for lemma in syn.lemmas():
            name = lemma.name().replace("_", " ")
            if name.lower() != word.lower() and name not in out:
                out.append(name)
    return out[:limit]


def wordnet_similarity(a: str, b: str) -> float:
    """Wu-Palmer similarity of the first noun senses (0 when either word has none)."""
    wn = _wordnet()
    sa, sb = wn.synsets(a.replace(" ", "_"), pos="n"), wn.synsets(b.replace(" ", "_"), pos="n")
    if not sa or not sb:
        return 0.0
    return float(sa[0].wup_similarity(sb[0]) or 0.0)


BANDS = {"no_relation": (0.0, 0.3), "far": (0.3, 0.55), "mid": (0.55, 0.85)}


def irrelevant_in_bands(word: str, candidates: list[str], per_band: int = 1, seed: int = 0) -> dict[str, list[str]]:
    """Pick irrelevant concepts from ``candidates`` in each WordNet-similarity band (App. C)."""
    rng = random.Random(seed)
    scored = [(c, wordnet_similarity(word, c)) for c in candidates if c.lower() != word.lower()]
    out: dict[str, list[str]] = {}
    for band, (lo, hi) in BANDS.items():
        pool = [c for c, s in scored if lo <= s < hi]
        rng.shuffle(pool)
        out[band] = pool[:per_band]
    return out
