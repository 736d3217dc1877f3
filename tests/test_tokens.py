"""Word → token indices for T5-style sub-word tokenizers."""
import random

import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

from erase_core.sandbox.tokenizer import train_tokenizer
from erase_core.tokens import shuffle_words, tokenize_with_offsets, word_spans, word_token_indices

CORPUS = ["a red circle in the west", "a crimson disc", "van gogh painted a starry night", "a cruciform shape",
          "the nude statue", "a scarlet orb to the north"] * 30


@pytest.fixture(scope="module")
def t5like():
    return train_tokenizer(CORPUS, vocab_size=60)


def pieces(tok, prompt, word):
    tp = tokenize_with_offsets(tok, prompt)
    return [tp.tokens[i] for i in word_token_indices(tok, prompt, word)]


def test_multi_token_words_are_covered_whole(t5like):
    for prompt, word in [("van gogh painted a starry night", "van gogh"), ("a cruciform shape", "cruciform"),
                         ("a scarlet orb to the north", "scarlet")]:
        got = pieces(t5like, prompt, word)
        assert "".join(got).replace("▁", "") == word.replace(" ", "")
    assert len(pieces(t5like, "a cruciform shape", "cruciform")) > 1


def test_every_occurrence_case_insensitive(t5like):
    tp = tokenize_with_offsets(t5like, "Red circle, a RED red disc")
    idx = word_token_indices(t5like, "Red circle, a RED red disc", "red")
    assert "".join(tp.tokens[i] for i in idx).replace("▁", "").lower() == "redredred"


def test_whole_words_only(t5like):
    assert word_spans("a reddish red", "red") == [(10, 13)]
    with pytest.raises(ValueError, match="does not occur"):
        word_token_indices(t5like, "a reddish circle", "red")


def test_absent_word_and_empty_word_errors(t5like):
    with pytest.raises(ValueError, match="'blue' does not occur in prompt 'a red circle'"):
        word_token_indices(t5like, "a red circle", "blue")
    with pytest.raises(ValueError, match="empty"):
        word_token_indices(t5like, "a red circle", "  ")


def test_indices_follow_the_word_after_shuffling(t5like):
    rng = random.Random(3)
    base = "van gogh painted a red circle in the west"
    for _ in range(10):
        shuffled = shuffle_words(base, rng, keep="van gogh")
        assert "van gogh" in shuffled
        for word in ("van gogh", "red", "west"):
            tp = tokenize_with_offsets(t5like, shuffled)
            text = "".join(tp.tokens[i] for i in word_token_indices(t5like, shuffled, word)).replace("▁", "")
            assert text == word.replace(" ", "")


def test_no_bos_and_eos_never_selected(t5like):
    tp = tokenize_with_offsets(t5like, "a red circle")
    assert tp.tokens[-1] == "</s>"
    assert len(tp.tokens) - 1 not in word_token_indices(t5like, "a red circle", "circle")
    assert word_token_indices(t5like, "red circle", "red")[0] == 0


def test_word_level_and_transformers_fast_tokenizers():
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "red": 4, "circle": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    assert word_token_indices(tok, "A red circle red", "red") == [1, 3]
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    assert word_token_indices(fast, "A red circle red", "red") == [1, 3]


def test_sandbox_tokenizer_splits_some_concept_words(world):
    multi = [w for w in ("northwest", "cruciform", "tangerine", "turquoise", "lozenge")
             if len(word_token_indices(world.tokenizer, f"a {w}", w)) > 1]
    assert len(multi) >= 3


def test_transformers_t5_tokenizer_layout(t5like):
    """Flux's T5 tokenizer class (transformers' T5Tokenizer, here with the unigram vocab trained above)."""
    from transformers import T5Tokenizer

    import json

    vocab = [tuple(x) for x in json.loads(t5like.to_str())["model"]["vocab"]]
    t5 = T5Tokenizer(vocab=vocab, extra_ids=0)
    prompt = "A scarlet orb to the north, a scarlet disc"
    idx = word_token_indices(t5, prompt, "scarlet")
    tp = tokenize_with_offsets(t5, prompt)
    assert tp.tokens[-1] == "</s>"
    text = "".join(tp.tokens[i] for i in idx).replace("▁", "")
    assert text.lower() == "scarletscarlet"
