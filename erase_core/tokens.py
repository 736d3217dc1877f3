"""Word → token indices inside a prompt, for any tokenizer that reports character offsets (T5-style sub-words).

Flux's joint attention sees T5 tokens, so the erased word's columns are the T5 tokens whose character spans overlap a
whole-word, case-insensitive occurrence of the word (every occurrence). A lone ``▁`` piece that T5 emits in front of a
rare word belongs to that word. T5 has no BOS, so indices start at 0.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

METASPACE = "▁"


@dataclass(frozen=True)
class TokenizedPrompt:
    """Tokens of a prompt with their character spans (special tokens have empty spans)."""

    prompt: str
    tokens: tuple[str, ...]
    offsets: tuple[tuple[int, int], ...]


def tokenize_with_offsets(tokenizer, prompt: str) -> TokenizedPrompt:
    """Tokens and character offsets from a ``tokenizers.Tokenizer`` or a transformers fast tokenizer."""
    if hasattr(tokenizer, "encode") and hasattr(tokenizer, "get_vocab_size"):  # tokenizers.Tokenizer
        enc = tokenizer.encode(prompt)
        return TokenizedPrompt(prompt, tuple(enc.tokens), tuple(tuple(o) for o in enc.offsets))
    if callable(tokenizer):  # transformers PreTrainedTokenizerFast
        enc = tokenizer(prompt, return_offsets_mapping=True, add_special_tokens=True)
        tokens = tokenizer.convert_ids_to_tokens(enc["input_ids"])
        return TokenizedPrompt(prompt, tuple(tokens), tuple(tuple(o) for o in enc["offset_mapping"]))
    raise TypeError(f"tokenizer of type {type(tokenizer).__name__} cannot report character offsets; "
                    "pass a `tokenizers.Tokenizer` or a transformers fast tokenizer")


def word_spans(prompt: str, word: str) -> list[tuple[int, int]]:
    """Character spans of every whole-word, case-insensitive occurrence of ``word`` (a word or phrase)."""
    parts = word.split()
    if not parts:
        raise ValueError("word is empty; give the word or phrase to find, e.g. 'red' or 'Van Gogh'")
    pattern = r"(?<!\w)" + r"\s+".join(re.escape(p) for p in parts) + r"(?!\w)"
    return [m.span() for m in re.finditer(pattern, prompt, flags=re.IGNORECASE)]


def _overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1] and a[1] > a[0]


def token_indices(tokenized: TokenizedPrompt, word: str) -> list[int]:
    """Indices of the tokens that make up every occurrence of ``word``; a clear error when it does not occur."""
    spans = word_spans(tokenized.prompt, word)
    if not spans:
        raise ValueError(f"word {word!r} does not occur in prompt {tokenized.prompt!r}; "
                         "check the spelling or choose a word of the prompt")
    hits: set[int] = set()
    for span in spans:
        inside = [i for i, off in enumerate(tokenized.offsets) if _overlaps(off, span)]
        first = inside[0] if inside else None
        if (first and tokenized.tokens[first - 1] == METASPACE and not tokenized.tokens[first].startswith(METASPACE)
                and tokenized.offsets[first - 1][1] <= span[0] + 1):
            inside.insert(0, first - 1)  # T5's lone "▁" in front of a rare word is part of that word
        hits.update(inside)
    if not hits:
        raise ValueError(f"word {word!r} occurs in prompt {tokenized.prompt!r} but maps to no token")
    return sorted(hits)


def word_token_indices(tokenizer, prompt: str, word: str) -> list[int]:
    """Token indices of ``word`` in ``prompt`` for ``tokenizer`` (see :func:`token_indices`)."""
    return token_indices(tokenize_with_offsets(tokenizer, prompt), word)


def shuffle_words(prompt: str, rng: random.Random, keep: str | None = None) -> str:
    """The prompt's words in a random order; a multi-word ``keep`` phrase stays together as one unit."""
    if keep and len(keep.split()) > 1:
        marker = "\x00"
        joined = re.sub(r"(?<!\w)" + r"\s+".join(map(re.escape, keep.split())) + r"(?!\w)",
                        lambda m: m.group(0).replace(" ", marker), prompt, flags=re.IGNORECASE)
        words = joined.split()
        rng.shuffle(words)
        return " ".join(w.replace(marker, " ") for w in words)
    words = prompt.split()
    rng.shuffle(words)
    return " ".join(words)


def replace_word(prompt: str, word: str, replacement: str) -> str:
    """``prompt`` with every whole-word, case-insensitive occurrence of ``word`` replaced (spaces tidied)."""
    out = re.sub(rf"(?<!\w){re.escape(word)}(?!\w)", replacement, prompt, flags=re.I)
    return re.sub(r"\s+", " ", out).strip()
