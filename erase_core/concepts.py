"""What an erase is trained on: the concept's prompts, a synonym, irrelevant concepts, preserved prompts.

Offline by default: synonyms come from NLTK WordNet (Debian's copy, see scripts/install_wordnet.py), irrelevant
concepts are picked in three bands of WordNet similarity (EraseAnything App. C: no_relation / far / mid). User lists
always win.
"""
from __future__ import annotations

import dataclasses
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
    """Lemmas of the word's most used noun/adjective senses (SemCor counts of the word in each synset; taken in turn,
    so every sense is represented), without the word itself. Proper names are kept only for proper-name concepts: "red" gives crimson, scarlet…, not Bolshevik;
    "van gogh" gives Vincent van Gogh."""
    wn = _wordnet()
    key = word.strip().lower().replace(" ", "_")
    synsets = [s for s in wn.synsets(key) if s.pos() in ("n", "a", "s")]

    def own(s):
        return [lemma for lemma in s.lemmas() if lemma.name().lower() == key]

    def count(s) -> int:
        return sum(lemma.count() for lemma in own(s))

    ranked = sorted(range(len(synsets)), key=lambda i: (-count(synsets[i]), i))
    chosen = [synsets[i] for i in ranked if count(synsets[i]) > 0][:3] or [synsets[i] for i in ranked][:2]
    per_sense = []
    for syn in chosen:
        proper = any(ch.isupper() for lemma in own(syn) for ch in lemma.name())
        names = [lemma.name().replace("_", " ") for lemma in syn.lemmas()]
        per_sense.append([n for n in names if n.lower() != word.strip().lower()
                          and (proper or not any(ch.isupper() for ch in n))])
    out: list[str] = []
    for rank in range(max((len(p) for p in per_sense), default=0)):  # round robin: every sense is represented
        out += [p[rank] for p in per_sense if rank < len(p) and p[rank] not in out]
    return out[:limit]


def wordnet_similarity(a: str, b: str) -> float:
    """Wu-Palmer similarity of the first noun senses (0 when either word has none)."""
    wn = _wordnet()
    sa, sb = wn.synsets(a.replace(" ", "_"), pos="n"), wn.synsets(b.replace(" ", "_"), pos="n")
    if not sa or not sb:
        return 0.0
    return float(sa[0].wup_similarity(sb[0]) or 0.0)


BANDS = {"no_relation": (0.0, 0.3), "far": (0.3, 0.55), "mid": (0.55, 0.85)}


def irrelevant_in_bands(word: str, candidates: list[str], per_band: int = 1, seed: int = 0,
                        total: int | None = None) -> dict[str, list[str]]:
    """Pick irrelevant concepts from ``candidates`` in each WordNet-similarity band (App. C).

    ``total``: top the picks up to this many from the bands' leftovers (in turn) when some band is empty, e.g. for an
    adjective, which WordNet relates to no noun: the RSC wants K concepts (paper K = 3) whatever their bands."""
    rng = random.Random(seed)
    scored = [(c, wordnet_similarity(word, c)) for c in candidates if c.lower() != word.lower()]
    out: dict[str, list[str]] = {}
    pools: dict[str, list[str]] = {}
    for band, (lo, hi) in BANDS.items():
        pool = [c for c, s in scored if lo <= s < hi]
        rng.shuffle(pool)
        out[band], pools[band] = pool[:per_band], pool[per_band:]
    while total is not None and sum(map(len, out.values())) < total and any(pools.values()):
        for band in BANDS:
            if pools[band] and sum(map(len, out.values())) < total:
                out[band].append(pools[band].pop(0))
    return out


# --- optional LLM (OpenAI-compatible chat endpoint; the reply is parsed as JSON, never evaluated) --------------
LLM_PROMPT = (
    "You help erase the concept '{concept}' from a text-to-image model. List {k} concepts that are irrelevant to it "
    "in each of three bands: 'no_relation' (nothing in common), 'far' (same broad domain, clearly different), 'mid' "
    "(related but distinct, must not be erased). Answer only with JSON: "
    '{{"no_relation": [...], "far": [...], "mid": [...]}}')


def parse_llm_bands(text: str, k: int) -> dict[str, list[str]]:
    """Validate an LLM reply: a JSON object with the three bands, each a list of short strings."""
    import json

    match = re.search(r"\{.*\}", text, flags=re.S)
    if not match:
        raise ValueError(f"the LLM reply holds no JSON object: {text[:120]!r}")
    try:
        data = json.loads(match.group(0))
    except json.JSONDecodeError as exc:
        raise ValueError(f"the LLM reply is not valid JSON ({exc.msg}): {match.group(0)[:120]!r}") from None
    out: dict[str, list[str]] = {}
    for band in BANDS:
        items = data.get(band)
        if not isinstance(items, list) or not all(isinstance(x, str) and 0 < len(x.strip()) <= 60 for x in items):
            raise ValueError(f"the LLM reply's {band!r} must be a list of short strings, got {items!r}")
        out[band] = [x.strip() for x in items][:k]
    return out


def llm_irrelevant(concept: str, endpoint: str, model: str, api_key: str | None = None, k: int = 3,
                   timeout: float = 60.0) -> dict[str, list[str]]:
    """Irrelevant concepts in bands from an OpenAI-compatible ``/chat/completions`` endpoint (App. C)."""
    import json
    import urllib.request

    body = json.dumps({"model": model, "temperature": 0,
                       "messages": [{"role": "user", "content": LLM_PROMPT.format(concept=concept, k=k)}]}).encode()
    req = urllib.request.Request(endpoint.rstrip("/") + "/chat/completions", data=body, method="POST",
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {api_key}"} if api_key else {})})
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (user-configured endpoint)
        reply = json.loads(resp.read().decode())
    try:
        text = reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise ValueError(f"endpoint {endpoint} did not answer in the chat-completions format") from None
    return parse_llm_bands(text, k)


def build_concept_set(word: str, prompts: list[str], synonyms: list[str] | None = None,
                      irrelevant: list[str] | None = None, preserve_prompts: list[str] | None = None,
                      candidates: list[str] | None = None, anchor: str = "", seed: int = 0) -> ConceptSet:
    """A concept set for real Flux: user lists win; otherwise WordNet synonyms and banded irrelevant concepts
    picked from ``candidates`` (one per band). ``preserve_prompts=None`` preserves the irrelevant concepts in the
    concept's own sentences (:func:`irrelevant_preserve_prompts`); ``[]`` preserves nothing."""
    syn = list(synonyms) if synonyms is not None else wordnet_synonyms(word)
    if irrelevant is None:
        bands = irrelevant_in_bands(word, candidates or [], seed=seed, total=3) if candidates else {}
        irrelevant = [c for band in bands.values() for c in band]
    else:
        bands = {}
    cs = ConceptSet(word=word, prompts=tuple(prompts), synonyms=tuple(syn), irrelevant=tuple(irrelevant),
                    preserve_prompts=tuple(preserve_prompts or ()), anchor=anchor, bands=bands)
    if preserve_prompts is None:
        cs = dataclasses.replace(cs, preserve_prompts=irrelevant_preserve_prompts(cs))
    return cs


def irrelevant_preserve_prompts(cs: ConceptSet) -> tuple[str, ...]:
    """EraseAnything's upper level keeps images of prompts that hold the erased concept's context with an irrelevant
    concept (Sec. 4, "a nude girl" → keep "girl"): here each irrelevant concept in place of the word in one of the
    concept's prompts (in turn), so the sentences an erase touches keep drawing everything but the concept."""
    return tuple(cs.substitute(cs.prompts[i % len(cs.prompts)], other) for i, other in enumerate(cs.irrelevant))
