"""Incremental detokenization and stop strings for streaming generation.

`IncrementalDetokenizer` turns generated token ids, one at a time, into text deltas. Decoding each
token alone would be wrong twice over: a byte-level BPE token can end in the middle of a UTF-8
character (alone it decodes to U+FFFD), and SentencePiece / WordPiece decoders drop or add a word's
leading space depending on the tokens before it. So, as vLLM and TGI do, it decodes a short window of
the latest tokens twice, up to the read offset (text already streamed) and up to the newest token,
and streams only the difference, and only once it does not end in U+FFFD (an incomplete character).

`StopChecker` sits after it: text that could be the start of a stop string is held back until the
stop string completes (generation finishes with `FinishReason.STOP`, the stop string and the held
text are never streamed) or is ruled out (the held text is released). `TextStream` composes the two.
"""
from __future__ import annotations

import enum
from typing import Sequence

REPLACEMENT_CHAR = "\ufffd"
INITIAL_CONTEXT_TOKENS = 5      # prompt tokens decoded as context before the first generated one


class FinishReason(str, enum.Enum):
    STOP = "stop"               # a stop token id or a stop string
    LENGTH = "length"           # max_new_tokens (or the context) reached
    CANCELLED = "cancelled"     # the client went away or cancelled


class IncrementalDetokenizer:
    """`add(token_id)` returns the text the token adds (maybe "", until a character or word is
    complete); `flush()` at the end returns what is still held (an incomplete character is then
    emitted as the tokenizer decodes it). The joined deltas of a sequence equal
    `tokenizer.decode(ids, skip_special_tokens=...)`, or with prompt_ids, the continuation of the
    prompt's text."""

    def __init__(self, tokenizer, prompt_ids: Sequence[int] | None = None, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = [int(t) for t in (() if prompt_ids is None else prompt_ids)]
        self.read_offset = len(self.token_ids)                   # tokens whose text is streamed
        self.prefix_offset = self._context_start()               # window start
        self.text = ""                                           # everything streamed so far

    def _context_start(self) -> int:
        """Where the window starts in the prompt: INITIAL_CONTEXT_TOKENS tokens back, not counting the
        special tokens the decode skips (a window of skipped tokens only would give no context)."""
        skipped = set(getattr(self.tokenizer, "all_special_ids", ())) if self.skip_special_tokens else set()
        start, num_context = self.read_offset, 0
        while start > 0 and num_context < INITIAL_CONTEXT_TOKENS:
            start -= 1
            num_context += self.token_ids[start] not in skipped
        return start

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=self.skip_special_tokens)

    def _delta(self, is_final: bool) -> str:
        prefix_text = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.token_ids[self.prefix_offset:])
        if len(new_text) <= len(prefix_text) or (new_text.endswith(REPLACEMENT_CHAR) and not is_final):
            return ""
        delta = new_text[len(prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        self.text += delta
        return delta

    def add(self, token_id: int) -> str:
        self.token_ids.append(int(token_id))
        return self._delta(is_final=False)

    def flush(self) -> str:
        if self.read_offset == len(self.token_ids):
            return ""
        return self._delta(is_final=True)


class StopChecker:
    """`feed(delta)` returns the part of the text that is safe to stream; once a stop string appears,
    `is_stopped` is True, the text before it is the last returned and everything after is dropped.
    `flush()` (at a finish for another reason) releases the held-back partial match."""

    def __init__(self, stop_strings: Sequence[str], include: bool = False):
        """include (vLLM's include_stop_str_in_output): the stop string that ends the text is part of it."""
        if isinstance(stop_strings, str):
            raise ValueError("stop must be a sequence of strings, not one string")
        for s in stop_strings:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must hold non-empty strings, got {s!r}")
        self.stop_strings, self.include = tuple(stop_strings), include
        self._held = ""
        self._unchecked = 0                                     # leading characters of _held fed with check=False
        self.is_stopped = False
        self.matched: str | None = None                         # the stop string that finished it

    def feed(self, delta: str, check: bool = True) -> str:
        """check False (a request's first min_tokens - 1 tokens): no stop string is looked for in this text; a stop
        string found later counts only where it ends after it (it may start in it)."""
        if self.is_stopped:
            return ""
        text = self._held + delta
        if check:
            found = [(i, -len(s), s) for s in self.stop_strings
                     for i in (text.find(s, max(0, self._unchecked - len(s) + 1)),) if i >= 0]
            if found:
                index, _, self.matched = min(found)              # earliest, longest on a tie
                self.is_stopped, self._held = True, ""
                return text[:index + len(self.matched)] if self.include else text[:index]
        held = self._partial_suffix(text)
        self._held = text[len(text) - held:]
        self._unchecked = held if not check else max(0, self._unchecked - (len(text) - held))
        return text[:len(text) - held]

    def _partial_suffix(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of a stop string."""
        longest = min(len(text), max((len(s) for s in self.stop_strings), default=1) - 1)
        for k in range(longest, 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stop_strings):
                return k
        return 0

    def flush(self) -> str:
        if self.is_stopped:
            return ""
        held, self._held = self._held, ""
        return held


class TextStream:
    """One request's streamed text: token ids in, safe text deltas out. `add` returns the delta and
    sets `finish_reason` to STOP when a stop string completes (the caller then stops generating);
    `finish(reason)` ends the stream for another reason and returns the text still held back."""

    def __init__(self, tokenizer, stop_strings: Sequence[str] = (), prompt_ids: Sequence[int] | None = None,
                 skip_special_tokens: bool = True, include_stop: bool = False):
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens)
        self.stop = StopChecker(stop_strings, include_stop)
        self.finish_reason: FinishReason | None = None
        self.text = ""                                           # everything streamed so far

    def _emit(self, delta: str, check_stop: bool = True) -> str:
        out = self.stop.feed(delta, check_stop)
        if self.stop.is_stopped:
            self.finish_reason = FinishReason.STOP
        self.text += out
        return out

    def add(self, token_id: int, check_stop: bool = True) -> str:
        """check_stop False: this token's text is not searched for stop strings (min_tokens)."""
        if self.finish_reason is not None:
            raise ValueError(f"stream already finished ({self.finish_reason.value})")
        return self._emit(self.detokenizer.add(token_id), check_stop)

    def finish(self, reason: FinishReason) -> str:
        """The text still held back, released (after a STOP from a stop string there is none)."""
        if self.finish_reason is not None:
            return ""
        out = self._emit(self.detokenizer.flush())
        if self.finish_reason is None:
            self.finish_reason = FinishReason(reason)
            if self.finish_reason is not FinishReason.CANCELLED:
                tail = self.stop.flush()
                self.text += tail
                out += tail
        return out
