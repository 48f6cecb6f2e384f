"""Bounded tokenization (vbert.tokens): the same ids as tokenizing the whole text and cutting it,
for the tiny and the real tokenizer, at a cost bounded by the token limit."""
from __future__ import annotations

import random

import pytest

from vbert.tokens import FIRST_CHARS_PER_TOKEN, MAX_CHARS_PER_TOKEN, TextTooLong, tokenize_bounded
from tests.conftest import TINY_WORDS


def whole_then_cut(tok, text, limit, truncate):
    row = tok(text, truncation=False)["input_ids"]
    if len(row) <= limit:
        return row
    return row[:limit - 1] + row[-1:] if truncate else None


def random_texts(words, seed):
    rng = random.Random(seed)
    seps = [" ", "  ", "\n", ", ", ". ", "\t", " é ", "-", "ü"]
    for n in (1, 3, 10, 60, 200, 700, 3000):
        yield "".join(rng.choice(words) + rng.choice(seps) for _ in range(n)) + rng.choice(["", " ", "!"])


@pytest.fixture(scope="module")
def tokenizers(tiny_checkpoint, default_checkpoint):
    from transformers import AutoTokenizer
    return [AutoTokenizer.from_pretrained(str(p), local_files_only=True) for p in (tiny_checkpoint, default_checkpoint)]


@pytest.mark.parametrize("seed", range(3))
def test_same_ids_as_the_whole_text_cut(tokenizers, seed):
    words = list(TINY_WORDS) + ["naïve", "café", "(x)", "state-of-the-art", "Überprüfung", "co.", "42%"]
    for tok in tokenizers:
        texts = list(random_texts(words, seed))
        for limit in (5, 16, 128, 512):
            for truncate in (True, False):
                got = tokenize_bounded(tok, texts, [limit] * len(texts), [truncate] * len(texts))
                for text, row in zip(texts, got):
                    expected = whole_then_cut(tok, text, limit, truncate)
                    if expected is None:
                        assert isinstance(row, TextTooLong) and f"limit of {limit}" in str(row)
                    else:
                        assert row == expected


def test_a_huge_text_is_read_only_up_to_its_window(tokenizers):
    tok = tokenizers[1]
    seen = []

    def counting(texts, **kw):
        seen.extend(len(t) for t in texts)
        return tok(texts, **kw)

    huge = " ".join(["disease"] * 200_000)            # 1.6 million characters
    (row,) = tokenize_bounded(counting, [huge], [512], [True])
    assert row == whole_then_cut(tok, huge, 512, True)
    assert max(seen) <= FIRST_CHARS_PER_TOKEN * 512    # the first window already decided it


def test_texts_beyond_the_character_bound(tokenizers):
    tok = tokenizers[1]
    spaces = "a" + " " * (MAX_CHARS_PER_TOKEN * 16 + 5) + "b"   # 2 tokens in more characters than read
    (cut,) = tokenize_bounded(tok, [spaces], [16], [True])
    assert cut == tok("a")["input_ids"]                # read up to the bound: 'b' lies beyond it
    (refused,) = tokenize_bounded(tok, [spaces], [16], [False])
    assert isinstance(refused, TextTooLong) and "characters" in str(refused)
