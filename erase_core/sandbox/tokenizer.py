"""A T5-style sub-word tokenizer for the sandbox (unigram pieces with a ``▁`` word prefix, ``</s>`` appended).

Like T5 it has no BOS, ``<pad>`` = 0, ``</s>`` = 1 and ``<unk>`` = 2, and many concept words span several pieces.
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"


def train_tokenizer(lines: list[str], vocab_size: int = 320) -> Tokenizer:
    """Train a unigram tokenizer on ``lines`` (deterministic for a given corpus)."""
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS, UNK], unk_token=UNK,
                                      shrinking_factor=0.75, max_piece_length=8, n_sub_iterations=2)
    tok.train_from_iterator(lines, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, 1)])
    return tok


def load_tokenizer(path: str | Path, max_length: int) -> Tokenizer:
    """Load a saved tokenizer and make it pad/truncate to ``max_length`` like Flux's T5 (no attention mask)."""
    tok = Tokenizer.from_file(str(path))
    tok.enable_padding(pad_id=0, pad_token=PAD, length=max_length)
    tok.enable_truncation(max_length=max_length)
    return tok
