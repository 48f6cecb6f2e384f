"""Structured output: a request's answer constrained to a JSON Schema, any JSON object, a regular expression, one of
a list of strings, or a Lark grammar, by masking the tokens the grammar does not allow at each step.

The grammars are compiled and matched by llguidance (the library behind vLLM's `guidance` backend): an `LLTokenizer`
is built once per tokenizer (about half a second for SmolLM2's 49,152 tokens), a `Matcher` per request follows the
tokens it is given and says which may come next (a bitmask, unpacked here to a bool row for the sampler) and when
the grammar is complete. `StructuredOutput` is the request's choice, validated at construction without a tokenizer
(kinds, sizes, JSON that parses); whether the grammar compiles is checked against the tokenizer
(`StructuredCompiler.check`, at the edge before anything is queued); the engine makes the request's matcher.
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

KINDS = ("json", "json_object", "regex", "choice", "grammar")
MAX_SPEC_CHARS = 64 * 1024        # a schema, regex or grammar; the choices together
MAX_CHOICES = 256
# JSON may put whitespace between its tokens; unbounded, a small or unsure model can fill its whole answer with
# newlines (the random test decoder does). At most 16 characters per gap still allows indented output; a schema's
# "x-guidance" options can change it.
JSON_OPTIONS = {"whitespace_pattern": r"[\x20\x0A\x0D\x09]{0,16}"}


@dataclass(frozen=True)
class StructuredOutput:
    """kind (vLLM's names): "json" (value: a JSON Schema, as JSON text or a dict), "json_object" (any JSON object;
    value ignored), "regex" (value: a regular expression the whole answer matches), "choice" (value: the strings, the
    answer is exactly one of them), "grammar" (value: a Lark grammar in llguidance's dialect). A bad kind or value
    raises ValueError naming the field."""
    kind: str
    value: str | tuple[str, ...] = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"structured output: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        value = self.value
        if self.kind == "json":
            if isinstance(value, dict):
                value = json.dumps(value)     # in its order: properties are written in it
            if not isinstance(value, str):
                raise ValueError(f"structured output json: expected a JSON Schema, got {type(value).__name__}")
            try:
                schema = json.loads(value)
            except ValueError as e:
                raise ValueError(f"structured output json: the schema is not valid JSON ({e})") from None
            if not isinstance(schema, (dict, bool)):
                raise ValueError("structured output json: the schema must be a JSON object")
        elif self.kind == "json_object":
            value = ""
        elif self.kind == "choice":
            if isinstance(value, str) or not isinstance(value, (tuple, list)) or not value:
                raise ValueError("structured output choice: expected a non-empty list of strings")
            if len(value) > MAX_CHOICES or not all(isinstance(v, str) and v for v in value):
                raise ValueError(f"structured output choice: 1..{MAX_CHOICES} non-empty strings")
            value = tuple(value)
        elif not isinstance(value, str) or not value:
            raise ValueError(f"structured output {self.kind}: expected a non-empty string")
        size = sum(map(len, value)) if isinstance(value, tuple) else len(value)
        if size > MAX_SPEC_CHARS:
            raise ValueError(f"structured output {self.kind}: at most {MAX_SPEC_CHARS} characters, got {size}")
        object.__setattr__(self, "value", value)

    def grammar(self) -> str:
        """llguidance's grammar text for it."""
        from llguidance import LLMatcher

        if self.kind == "json":
            return LLMatcher.grammar_from_json_schema(self.value, defaults=JSON_OPTIONS)
        if self.kind == "json_object":
            return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
        if self.kind == "regex":
            return LLMatcher.grammar_from_regex(self.value)
        if self.kind == "choice":
            return LLMatcher.grammar_from_lark(
                "start: " + " | ".join(json.dumps(v, ensure_ascii=False) for v in self.value))   # Lark literals
        return LLMatcher.grammar_from_lark(self.value)


class Matcher:
    """One request's grammar state: `fill(words)` writes the tokens allowed next as a bitmask (int32 [(vocab + 31)
    // 32], bit t % 32 of word t // 32; `allowed_tokens` unpacks many), `consume(token)` advances it (False with
    `error` set when the token breaks the grammar), `is_done` once the grammar is complete (nothing but the end of
    sequence may follow)."""

    def __init__(self, matcher, vocab_size: int):
        self._m, self.vocab_size = matcher, vocab_size

    def fill(self, words: torch.Tensor) -> None:
        if words.dtype != torch.int32 or not words.is_contiguous() or words.numel() * 32 < self.vocab_size:
            raise ValueError("fill needs a contiguous int32 row of (vocab + 31) // 32 words")
        self._m.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * 4)

    def consume(self, token: int) -> bool:
        return bool(self._m.consume_token(int(token)))

    @property
    def is_done(self) -> bool:
        return bool(self._m.is_stopped())

    @property
    def error(self) -> str:
        return self._m.get_error()


def allowed_tokens(matchers: Sequence[Matcher | None], vocab_size: int) -> torch.Tensor:
    """bool [len(matchers), vocab_size] on the host: the tokens each row may draw next (every token for a row
    without a matcher). The bitmasks unpack with numpy's unpackbits (little bit order: bit t % 32 of word t // 32),
    all rows at once: about 15 us a row for 49,152 tokens, where shifting in torch took 100."""
    words = torch.full((len(matchers), (vocab_size + 31) // 32), -1, dtype=torch.int32)       # [rows, words]
    for row, m in zip(words, matchers):
        if m is not None:
            m.fill(row)
    bits = np.unpackbits(words.numpy().view(np.uint8), axis=1, bitorder="little")[:, :vocab_size]
    return torch.from_numpy(bits).bool()


class StructuredCompiler:
    """The llguidance tokenizer of one Hugging Face (fast) tokenizer, built on first use; `check` and `matcher`
    compile a StructuredOutput against it. Thread-safe."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: Sequence[int]):
        self._hf, self.vocab_size, self.eos_token_ids = tokenizer, int(vocab_size), tuple(eos_token_ids)
        self._tokenizer = None
        self._lock = threading.Lock()

    def _llt(self):
        with self._lock:
            if self._tokenizer is None:
                import llguidance.hf

                self._tokenizer = llguidance.hf.from_tokenizer(self._hf, n_vocab=self.vocab_size,
                                                               eos_token=list(self.eos_token_ids) or None)
            return self._tokenizer

    def check(self, structured: StructuredOutput) -> None:
        """ValueError naming the problem when the grammar does not compile for this tokenizer (the edge's check:
        a few milliseconds; no mask is computed)."""
        self._compile(structured)

    def matcher(self, structured: StructuredOutput) -> Matcher:
        """A new matcher with its first mask computed, in the caller's thread (the engine's submit_async runs this
        in a worker): that mask's lexer work (2 s for a regex like (a{1000}){1000} on this CPU) would otherwise stall
        a decode step of every running request. ValueError as check, or when the first mask hits llguidance's
        limits."""
        m = self._compile(structured)
        matcher = Matcher(m, self.vocab_size)
        matcher.fill(torch.empty((self.vocab_size + 31) // 32, dtype=torch.int32))
        if m.is_error():
            raise ValueError(f"structured output {structured.kind}: {_first_line(m.get_error())}")
        return matcher

    def _compile(self, structured: StructuredOutput):
        from llguidance import LLMatcher

        try:
            grammar = structured.grammar()
        except ValueError as e:
            raise ValueError(f"structured output {structured.kind}: {e}") from None
        m = LLMatcher(self._llt(), grammar, log_level=0, limits=_limits())
        if m.is_error():
            raise ValueError(f"structured output {structured.kind}: {_first_line(m.get_error())}")
        return m


def _limits():
    """llguidance's own bounds on a grammar's work (its defaults: a mask step's lexer and parser work capped, the
    matcher errs beyond), with errors that do not echo the parser's state."""
    from llguidance import LLParserLimits

    return LLParserLimits(verbose_errors=False)


def _first_line(error: str) -> str:
    return " ".join(error.split())[:300]


_compilers: dict[int, StructuredCompiler] = {}
_compilers_lock = threading.Lock()


def compiler_for(tokenizer, vocab_size: int, eos_token_ids: Sequence[int]) -> StructuredCompiler:
    """The process's compiler of this tokenizer (the edge's check and the engine's matchers share its LLTokenizer)."""
    key = id(tokenizer)
    with _compilers_lock:
        c = _compilers.get(key)
        if c is None or c.vocab_size != vocab_size:     # the entry holds the tokenizer: its id is not reused
            c = _compilers[key] = StructuredCompiler(tokenizer, vocab_size, eos_token_ids)
        return c
