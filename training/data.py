"""Readers and encoders of the training data: classification JSON lines and CoNLL NER files.

Formats (see ../shared/data/README.md):
- classification: one JSON object per line with "text" and "label" (other keys, e.g. "metadata",
  are ignored); blank lines are skipped. Integer labels are turned into strings.
- NER (CoNLL): whitespace-separated columns, the word in the FIRST column, the IOB2 tag in the
  LAST one; a blank line ends a sentence; `-DOCSTART-` lines (and the blank line after them) are
  skipped.

Every problem in a file raises `DataError` naming the file and the line: "train.txt line 17: ...".

Label ids are positions in the sorted set of training labels (`label_list`, `ner_label_list`),
so they are stable across runs and machines.

Truncation (NER): `encode_ner` cuts sentences to `max_length` sub-tokens; words cut off are
absent from `word_ids`, and `word_level` then predicts "O" for them, so at evaluation a gold entity
in the cut-off tail counts as missed (it lowers recall), never silently dropped.
"""
from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

DOCSTART = "-DOCSTART-"
IGNORE_INDEX = -100  # label of sub-tokens that are not the first of a word, and of special tokens
_TAG = re.compile(r"^(O|[BI]-\S+)$")
_COLUMN_SEP = re.compile(r"[ \t]+")  # ASCII blanks only: odd Unicode characters stay in the word
_ENCODE_CHUNK = 1024  # examples per tokenizer call


class DataError(ValueError):
    """A problem in a data file; the message names the file and, where there is one, the line."""


@dataclass(frozen=True)
class ClassificationExample:
    text: str
    label: str
    line: int


@dataclass(frozen=True)
class NerExample:
    words: tuple[str, ...]
    tags: tuple[str, ...]
    line: int  # line of the sentence's first token; token i is on line `line + i`


# ---------------------------------------------------------------------------------------------
# Readers


def _read_lines(path) -> list[tuple[int, str]]:
    """(line number from 1, text without the line break) of every line of a UTF-8 file."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from e
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    raw_lines = data.split(b"\n")
    if raw_lines and raw_lines[-1] == b"":
        raw_lines.pop()
    lines = []
    for number, raw in enumerate(raw_lines, start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path} line {number}: not valid UTF-8 ({e.reason})") from e
        lines.append((number, text.rstrip("\r")))
    return lines


def read_json_objects(path) -> list[tuple[int, str, dict]]:
    """(line number, "<path> line N", object) of every non-blank line of a JSON-lines file; DataError
    naming the line for malformed JSON or a line that is not an object."""
    out = []
    for number, text in _read_lines(path):
        if not text.strip():
            continue
        where = f"{path} line {number}"
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from e
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        out.append((number, where, record))
    return out


def read_classification(path) -> list[ClassificationExample]:
    """Examples of a JSON-lines classification file, in file order."""
    examples = []
    for number, where, record in read_json_objects(path):
        body = record.get("text")
        if body is None:
            raise DataError(f"{where}: missing \"text\"")
        if not isinstance(body, str):
            raise DataError(f"{where}: \"text\" must be a string, got {type(body).__name__}")
        if not body.strip():
            raise DataError(f"{where}: empty \"text\"")
        label = record.get("label")
        if label is None:
            raise DataError(f"{where}: missing \"label\"")
        if isinstance(label, int) and not isinstance(label, bool):
            label = str(label)
        if not isinstance(label, str):
            raise DataError(f"{where}: \"label\" must be a string or an integer, got {type(label).__name__}")
        if not label.strip():
            raise DataError(f"{where}: empty \"label\"")
        examples.append(ClassificationExample(text=body, label=label, line=number))
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def read_conll(path) -> list[NerExample]:
    """Sentences of a CoNLL file (word = first column, IOB2 tag = last column), in file order."""
    examples: list[NerExample] = []
    words: list[str] = []
    tags: list[str] = []
    first_line = 0

    def end_sentence() -> None:
        if words:
            examples.append(NerExample(words=tuple(words), tags=tuple(tags), line=first_line))
            words.clear()
            tags.clear()

    for number, text in _read_lines(path):
        stripped = text.strip(" \t")
        if not stripped:
            end_sentence()
            continue
        columns = _COLUMN_SEP.split(stripped)
        if columns[0] == DOCSTART:
            end_sentence()  # a document boundary also ends a sentence; the blank after it is a no-op
            continue
        if len(columns) < 2:
            raise DataError(f"{path} line {number}: expected a word and a tag (whitespace-separated "
                            f"columns), got a single column {stripped!r}")
        tag = columns[-1]
        if not _TAG.match(tag):
            raise DataError(f"{path} line {number}: tag {tag!r} is not O, B-<type> or I-<type> (IOB2)")
        if not words:
            first_line = number
        words.append(columns[0])
        tags.append(tag)
    end_sentence()
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


# ---------------------------------------------------------------------------------------------
# Labels


def label_list(labels: Iterable) -> tuple[str, ...]:
    """Sorted unique labels (id = position). Accepts label strings or ClassificationExamples."""
    return tuple(sorted({getattr(label, "label", label) for label in labels}))


def ner_label_list(examples: Iterable[NerExample]) -> tuple[str, ...]:
    """Sorted unique tags of NER examples (id = position)."""
    return tuple(sorted({tag for example in examples for tag in example.tags}))


def _labels_with_lines(labels: Iterable) -> Iterable[tuple[str, int | None]]:
    for item in labels:
        if isinstance(item, NerExample):
            for offset, tag in enumerate(item.tags):
                yield tag, item.line + offset
        elif isinstance(item, ClassificationExample):
            yield item.label, item.line
        else:
            yield item, None


def check_labels(labels: Iterable, known: Sequence[str], path) -> None:
    """Raise DataError if a label is not in `known`, naming each unknown label and its first line.

    labels: ClassificationExamples, NerExamples (every tag is checked, with its own line) or plain
    label strings (then only the file is named).
    """
    known_set = set(known)
    unknown: dict[str, int | None] = {}
    for label, line in _labels_with_lines(labels):
        if label not in known_set and label not in unknown:
            unknown[label] = line
    if not unknown:
        return
    places = [f"{label!r} in {path}" + (f" line {line}" if line is not None else "")
              for label, line in unknown.items()]
    noun = "label" if len(places) == 1 else "labels"
    raise DataError(f"unknown {noun} {', '.join(places)} (known: {', '.join(known)})")


def split_dev(examples: Sequence, fraction: float = 0.1, seed: int = 0) -> tuple[list, list]:
    """(train, dev): a seeded random `fraction` of the examples held out as dev, both in input order.

    Deterministic for a given seed and input; with 2 or more examples each part gets at least one.
    A single example goes to train (dev empty).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    examples = list(examples)
    n = len(examples)
    if n < 2:
        return examples, []
    num_dev = min(max(round(n * fraction), 1), n - 1)
    dev_indices = set(random.Random(seed).sample(range(n), num_dev))
    train = [ex for i, ex in enumerate(examples) if i not in dev_indices]
    dev = [ex for i, ex in enumerate(examples) if i in dev_indices]
    return train, dev


# ---------------------------------------------------------------------------------------------
# Encoding


def _check_max_length(max_length: int) -> None:
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (room for the special tokens), got {max_length}")


def _label_id(label_ids: dict[str, int], label: str, line: int) -> int:
    try:
        return label_ids[label]
    except KeyError:
        raise DataError(f"example at line {line}: unknown label {label!r} "
                        f"(known: {', '.join(label_ids)})") from None


def encode_classification(tokenizer, examples: Sequence[ClassificationExample], label_ids: dict[str, int],
                          max_length: int) -> list[dict]:
    """Per example {"input_ids": [CLS] ... [SEP] truncated to max_length, "label": label id}."""
    _check_max_length(max_length)
    encoded = []
    for start in range(0, len(examples), _ENCODE_CHUNK):
        chunk = examples[start:start + _ENCODE_CHUNK]
        batch = tokenizer([ex.text for ex in chunk], truncation=True, max_length=max_length,
                          add_special_tokens=True)
        for ex, input_ids in zip(chunk, batch["input_ids"]):
            encoded.append({"input_ids": list(input_ids), "label": _label_id(label_ids, ex.label, ex.line)})
    return encoded


def encode_ner(tokenizer, examples: Sequence[NerExample], tag_ids: dict[str, int],
               max_length: int) -> list[dict]:
    """Per sentence {"input_ids", "labels", "word_ids"}, aligned token by token.

    labels: the tag id on the FIRST sub-token of each word, IGNORE_INDEX (-100) on its other
    sub-tokens and on special tokens. word_ids: the word index of each token (None for specials).
    Words cut off by truncation (or that tokenize to nothing) are absent from word_ids; see the
    module docstring for how evaluation counts them. Needs a fast (Rust) tokenizer.
    """
    _check_max_length(max_length)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("encode_ner needs a fast tokenizer (word_ids); load it with use_fast=True")
    encoded = []
    for start in range(0, len(examples), _ENCODE_CHUNK):
        chunk = examples[start:start + _ENCODE_CHUNK]
        batch = tokenizer([list(ex.words) for ex in chunk], is_split_into_words=True, truncation=True,
                          max_length=max_length, add_special_tokens=True)
        for i, ex in enumerate(chunk):
            word_ids = batch.word_ids(i)
            tag_of_word = [_label_id(tag_ids, tag, ex.line + k) for k, tag in enumerate(ex.tags)]
            labels = []
            previous = None
            for word_id in word_ids:
                if word_id is None or word_id == previous:
                    labels.append(IGNORE_INDEX)
                else:
                    labels.append(tag_of_word[word_id])
                previous = word_id
            encoded.append({"input_ids": list(batch["input_ids"][i]), "labels": labels,
                            "word_ids": list(word_ids)})
    return encoded


def word_level(token_labels: Sequence[str], word_ids: Sequence[int | None], num_words: int) -> list[str]:
    """Predicted label per word: the prediction on the word's first sub-token.

    token_labels: one label per token (entries on special tokens are ignored; a longer, padded
    list is fine). Words without a token (truncated away) get "O".
    """
    if len(token_labels) < len(word_ids):
        raise ValueError(f"{len(token_labels)} token labels for {len(word_ids)} tokens")
    words = ["O"] * num_words
    seen = set()
    for label, word_id in zip(token_labels, word_ids):
        if word_id is None or word_id in seen:
            continue
        if not 0 <= word_id < num_words:
            raise ValueError(f"word id {word_id} out of range for {num_words} words")
        seen.add(word_id)
        words[word_id] = label
    return words


# -- text corpora (distillation, n-gram tables) ----------------------------------------------------
CORPUS_FORMATS = ("auto", "text", "jsonl", "conll")


def _corpus_format(lines: list[tuple[int, str]]) -> str:
    first = next((t for _, t in lines if t.strip()), "")
    if first.lstrip().startswith("{"):
        return "jsonl"
    if "\t" in first or first.startswith("-DOCSTART-"):
        return "conll"
    return "text"


def check_corpus(paths) -> None:
    """ValueError unless at least one corpus file is given and every one exists."""
    if not paths:
        raise ValueError("give at least one corpus file")
    for path in paths:
        if not Path(path).is_file():
            raise ValueError(f"corpus file {path!r} does not exist")


def read_corpus(path, fmt: str = "auto") -> list[str]:
    """Sentences of a corpus file: plain text (one per line), JSON lines (their "text"), or CoNLL
    (words of a sentence joined by spaces). fmt "auto" decides from the first non-blank line: a JSON
    object -> jsonl, tab-separated columns or -DOCSTART- -> conll, else text."""
    if fmt not in CORPUS_FORMATS:
        raise ValueError(f"corpus format {fmt!r} is not one of {CORPUS_FORMATS}")
    lines = _read_lines(path)
    fmt = _corpus_format(lines) if fmt == "auto" else fmt
    if fmt == "jsonl":
        return _jsonl_texts(path, lines)
    if fmt == "conll":
        return [" ".join(ex.words) for ex in read_conll(path)]
    texts = [t.strip() for _, t in lines if t.strip()]
    if not texts:
        raise DataError(f"{path}: no text lines")
    return texts


def _jsonl_texts(path, lines: list[tuple[int, str]]) -> list[str]:
    texts = []
    for number, text in lines:
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: not a JSON object ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str) or not obj["text"].strip():
            raise DataError(f"{path}:{number}: expected an object with a non-empty \"text\"")
        texts.append(obj["text"])
    if not texts:
        raise DataError(f"{path}: no texts")
    return texts
