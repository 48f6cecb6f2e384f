"""Tokenization whose cost is bounded by the token limit, not by the length of the text.

A text of 200,000 words used to be tokenized in full and then cut to 512 tokens, on the thread
that prepares every tenant's next step. Here each text is first read up to a window of characters
(`FIRST_CHARS_PER_TOKEN` per token of its limit); only a text whose window does not yet hold more
tokens than the limit is read further (the window grows 4x per round), and never past
`MAX_CHARS_PER_TOKEN` characters per token of the limit.

Semantics (the test oracle): for every text whose first `MAX_CHARS_PER_TOKEN * limit` characters
hold more than `limit` tokens, or whose whole length fits in them, the result equals tokenizing the
whole text and keeping the first `limit - 1` tokens plus the final separator (or refusing it when
truncation is off). Exactness comes from counting only tokens that end before the last whitespace
of the window: a whitespace-splitting pre-tokenizer (BERT's, byte-level BPE) gives those tokens the
same ids whatever follows. The rest, texts averaging more than `MAX_CHARS_PER_TOKEN` characters per
token (runs of whitespace, single words of thousands of characters), are read up to that bound:
cut there when truncation is on, refused naming the bound when it is off.

`tokenize_bounded_spans` keeps, with each kept token, its (start, end) character offsets into the
text as given and its word index (from the same tokenizer call), for Tag's character offsets.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

FIRST_CHARS_PER_TOKEN = 8
MAX_CHARS_PER_TOKEN = 128
_LAST_SPACE = re.compile(r"\s\S*\Z")


class TextTooLong(Exception):
    """A predicate for the caller's error message, e.g. 'has more than 512 tokens ...'."""


@dataclass(frozen=True)
class TokenizedText:
    """One text's kept tokens: ids (with the special tokens), each token's (start, end) character
    offsets into the text as given ((0, 0) for special tokens) and its word index (the tokenizer's
    pre-tokenized word, e.g. BERT's split on whitespace and punctuation; None for special tokens)."""

    ids: list[int]
    offsets: list[tuple[int, int]]
    word_ids: list[int | None]


def tokenize_bounded(tokenizer, texts: Sequence[str], limits: Sequence[int],
                     truncate: Sequence[bool]) -> list[list[int] | TextTooLong]:
    """Token ids (with the tokenizer's special tokens) of each non-empty text, cut to its limit, or
    TextTooLong in its place when it exceeds the limit and truncation is off. Batched: one
    tokenizer call per round over the texts still undecided."""
    return [row if isinstance(row, TextTooLong) else row.ids
            for row in tokenize_bounded_spans(tokenizer, texts, limits, truncate)]


def tokenize_bounded_spans(tokenizer, texts: Sequence[str], limits: Sequence[int],
                           truncate: Sequence[bool]) -> list[TokenizedText | TextTooLong]:
    """`tokenize_bounded` with each kept token's character offsets and word index (a fast tokenizer)."""
    out: list[TokenizedText | TextTooLong | None] = [None] * len(texts)
    window = {i: FIRST_CHARS_PER_TOKEN * limits[i] for i in range(len(texts))}
    pending = list(range(len(texts)))
    while pending:
        cuts = [_cut(texts[i], window[i]) for i in pending]
        enc = tokenizer([c for c, _ in cuts], truncation=False, add_special_tokens=True,
                        return_offsets_mapping=True, return_special_tokens_mask=True)
        again = []
        for k, i in enumerate(pending):
            cut, boundary = cuts[k]
            row, special, offsets = enc["input_ids"][k], enc["special_tokens_mask"][k], enc["offset_mapping"][k]
            limit, num_specials, n = limits[i], sum(special), len(row)
            everything = list(range(n))
            first_and_last = list(range(limit - 1)) + [n - 1]         # positions kept by a plain cut
            keep: list[int] | TextTooLong
            if boundary is None:                                  # the whole text was read
                if n <= limit:
                    keep = everything
                elif truncate[i]:
                    keep = first_and_last
                else:
                    keep = TextTooLong(f"has {n} tokens, above the limit of {limit} (truncation is off)")
            elif (len(safe := [j for j in everything if not special[j] and offsets[j][1] <= boundary])
                  + num_specials > limit):                        # more than the limit: the prefix decides
                if truncate[i]:
                    head = [j for j in everything if special[j]][:1] if num_specials else []
                    tail = [n - 1] if num_specials > 1 else []
                    keep = head + safe[:limit - len(head) - len(tail)] + tail
                else:
                    keep = TextTooLong(f"has more than {len(safe) + num_specials - 1} tokens, above the limit "
                                       f"of {limit} (truncation is off)")
            elif window[i] >= MAX_CHARS_PER_TOKEN * limit:        # read as far as the bound allows
                if truncate[i]:
                    keep = everything if n <= limit else first_and_last
                else:
                    keep = TextTooLong(f"has {len(texts[i])} characters, more than the "
                                       f"{MAX_CHARS_PER_TOKEN * limit} read for a limit of {limit} tokens "
                                       f"(truncation is off)")
            else:
                window[i] = min(4 * window[i], MAX_CHARS_PER_TOKEN * limit)
                again.append(i)
                continue
            if isinstance(keep, TextTooLong):
                out[i] = keep
            else:
                words = enc.word_ids(k)
                out[i] = TokenizedText(ids=[row[j] for j in keep], offsets=[tuple(offsets[j]) for j in keep],
                                       word_ids=[None if special[j] else words[j] for j in keep])
        pending = again
    return out


def _cut(text: str, num_chars: int) -> tuple[str, int | None]:
    """(the first num_chars characters, the index of their last whitespace or 0), or (text, None)
    when the text is no longer than that."""
    if len(text) <= num_chars:
        return text, None
    prefix = text[:num_chars]
    m = _LAST_SPACE.search(prefix)
    return prefix, (m.start() if m else 0)
