"""Generation data: JSON lines of prompt/completion pairs or chats, encoded for causal-LM fine-tuning with
the loss on the completion only; and the converters that build such files from ../shared/data.

Formats (one JSON object per line; blank lines are skipped; other keys are ignored):
- `{"prompt": "...", "completion": "..."}`: the prompt is tokenized as the server tokenizes a raw
  prompt (the tokenizer's special tokens added), the completion without special tokens;
- `{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}`: the last message is the
  assistant's answer (the completion); everything before it goes through the backbone's chat template
  with the assistant's turn opened (add_generation_prompt), as the server renders `messages`.
The end-of-sequence token follows the completion, so a trained adapter learns to stop.

Every problem raises `DataError` naming the file and the line: "train.jsonl line 17: ...".

Encoded example: input_ids = prompt + completion + [eos]; labels = -100 on the prompt, the token ids on the
completion and the eos. A pair longer than max_length keeps the completion (cut to max_length - 1 tokens,
losing its eos only when the completion alone is that long) and the prompt's LAST tokens, as the server's
truncate_prompt keeps them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from .data import IGNORE_INDEX, DataError, read_classification, read_conll, read_json_objects

CHAT_ROLES = ("system", "user", "assistant")          # = vbert.decoder_backbone.CHAT_ROLES (no torch import here)


@dataclass(frozen=True)
class GenerationExample:
    """A prompt (raw text) or a chat (role, content pairs before the answer), and the completion."""

    completion: str
    line: int
    prompt: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None

    @property
    def is_chat(self) -> bool:
        return self.messages is not None

    def request(self) -> dict:
        """The prompt as the tenant API takes it: {"prompt": ...} or {"messages": [{"role", "content"}]}."""
        if self.messages is None:
            return {"prompt": self.prompt}
        return {"messages": [{"role": r, "content": c} for r, c in self.messages]}


def _string(record: dict, key: str, where: str, allow_empty: bool = False) -> str:
    value = record.get(key)
    if value is None:
        raise DataError(f"{where}: missing \"{key}\"")
    if not isinstance(value, str):
        raise DataError(f"{where}: \"{key}\" must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: empty \"{key}\"")
    return value


def _messages(record: dict, where: str) -> tuple[tuple[tuple[str, str], ...], str]:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects")
    pairs = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"{where}: messages[{i}] must be an object with \"role\" and \"content\"")
        role = _string(m, "role", f"{where}: messages[{i}]")
        if role not in CHAT_ROLES:
            raise DataError(f"{where}: messages[{i}].role {role!r} is not one of {CHAT_ROLES}")
        pairs.append((role, _string(m, "content", f"{where}: messages[{i}]", allow_empty=role != "assistant")))
    if pairs[-1][0] != "assistant":
        raise DataError(f"{where}: the last message must be the assistant's answer (the completion), "
                        f"got role {pairs[-1][0]!r}")
    if len(pairs) < 2:
        raise DataError(f"{where}: messages needs at least one message before the assistant's answer")
    return tuple(pairs[:-1]), pairs[-1][1]


def read_generation(path) -> list[GenerationExample]:
    """Examples of a generation JSON-lines file, in file order."""
    examples = []
    for number, where, record in read_json_objects(path):
        has_chat, has_prompt = "messages" in record, "prompt" in record or "completion" in record
        if has_chat and has_prompt:
            raise DataError(f"{where}: give either \"messages\" or \"prompt\" + \"completion\", not both")
        if has_chat:
            messages, completion = _messages(record, where)
            examples.append(GenerationExample(completion=completion, line=number, messages=messages))
        elif has_prompt:
            examples.append(GenerationExample(completion=_string(record, "completion", where), line=number,
                                              prompt=_string(record, "prompt", where)))
        else:
            raise DataError(f"{where}: expected \"prompt\" and \"completion\", or \"messages\"")
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


# -- encoding ---------------------------------------------------------------------------------------
def render_prompt(tokenizer, example: GenerationExample, path="") -> str:
    """The prompt's text as the server renders it (a chat through the tokenizer's chat template)."""
    if example.messages is None:
        return example.prompt
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{path} line {example.line}: \"messages\" needs a chat template, and this decoder's tokenizer "
                        f"has none; use \"prompt\" + \"completion\"")
    return tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in example.messages],
                                         add_generation_prompt=True, tokenize=False)


def prompt_ids(tokenizer, example: GenerationExample, path="") -> list[int]:
    """Token ids of the prompt, as vbert.decoder_backbone.DecoderBackbone.tokenize_prompt makes them."""
    return list(tokenizer(render_prompt(tokenizer, example, path), add_special_tokens=not example.is_chat)["input_ids"])


def encode_generation(tokenizer, examples: Sequence[GenerationExample], max_length: int,
                      eos_token_id: int, path="") -> list[dict]:
    """[{"input_ids", "labels", "num_prompt", "truncated", "line"}]: labels -100 on the prompt's tokens."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    out = []
    for ex in examples:
        prompt = prompt_ids(tokenizer, ex, path)
        completion = list(tokenizer(ex.completion, add_special_tokens=False)["input_ids"]) + [eos_token_id]
        truncated = len(completion) > max_length - 1
        completion = completion[:max_length - 1]
        keep = max_length - len(completion)
        truncated = truncated or len(prompt) > keep
        prompt = prompt[len(prompt) - keep:] if len(prompt) > keep else prompt
        if not prompt:
            raise DataError(f"{path} line {ex.line}: the prompt has no tokens")
        out.append({"input_ids": prompt + completion, "labels": [IGNORE_INDEX] * len(prompt) + completion,
                    "num_prompt": len(prompt), "truncated": truncated, "line": ex.line})
    return out


def collate(rows: Sequence[dict], pad_id: int):
    """input_ids [B, L] (right-padded with pad_id), attention_mask [B, L], labels [B, L] (-100 on the prompt
    and the padding) of encoded examples."""
    import torch

    length = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[b, :n] = torch.tensor(r["input_ids"], dtype=torch.long)
        mask[b, :n] = 1
        labels[b, :n] = torch.tensor(r["labels"], dtype=torch.long)
    return ids, mask, labels


# -- converters from ../shared/data ------------------------------------------------------------------
NER_INSTRUCTION = "List the disease mentions in this sentence, separated by \" ; \" (or \"none\")."
CLS_INSTRUCTION = "Classify the citation intent of this sentence as one of: {labels}."
NO_ENTITY = "none"


def entity_spans(words: Sequence[str], tags: Sequence[str]) -> list[str]:
    """The entity mentions of an IOB2-tagged sentence, as text (words joined by spaces), in order."""
    spans, current = [], []
    for word, tag in zip(words, tags):
        if tag.startswith("B-") or (tag.startswith("I-") and not current):
            if current:
                spans.append(" ".join(current))
            current = [word]
        elif tag.startswith("I-"):
            current.append(word)
        else:
            if current:
                spans.append(" ".join(current))
            current = []
    if current:
        spans.append(" ".join(current))
    return spans


def ner_to_generation(path, chat: bool = True) -> list[dict]:
    """NER sentences (CoNLL) as generation records: the sentence in, its mentions (" ; "-joined, "none") out."""
    records = []
    for ex in read_conll(path):
        sentence = " ".join(ex.words)
        answer = " ; ".join(entity_spans(ex.words, ex.tags)) or NO_ENTITY
        records.append(_record(f"{NER_INSTRUCTION}\n{sentence}", answer, chat))
    return records


def cls_to_generation(path, labels: Sequence[str] | None = None, chat: bool = True) -> list[dict]:
    """Classification examples (JSON lines {text, label}) as generation records: the label as the answer."""
    examples = read_classification(path)
    labels = sorted({ex.label for ex in examples}) if labels is None else list(labels)
    instruction = CLS_INSTRUCTION.format(labels=", ".join(labels))
    return [_record(f"{instruction}\n{ex.text}", ex.label, chat) for ex in examples]


def _record(prompt: str, completion: str, chat: bool) -> dict:
    if chat:
        return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]}
    return {"prompt": prompt + "\nAnswer: ", "completion": completion}


def write_jsonl(records: Iterable[dict], path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


# set name -> (folder under the data root, converter)
SHARED_SETS = {"ncbi-disease": ("ner/NCBI-disease", ner_to_generation), "sci-cite": ("cls/sci-cite", cls_to_generation)}
SPLITS = ("train", "dev", "test")


def build_shared_sets(data_root, out_dir, sets: Sequence[str] = tuple(SHARED_SETS), chat: bool = True,
                      max_examples: int | None = None) -> dict[str, dict[str, Path]]:
    """Write `<out_dir>/<set>/{train,dev,test}.jsonl` from the sets in data_root (read in place, e.g.
    ../shared/data); max_examples keeps the first N of each split. Classification sets use the training
    split's labels in every split's instruction. Returns {set: {split: path}}."""
    out: dict[str, dict[str, Path]] = {}
    for name in sets:
        if name not in SHARED_SETS:
            raise ValueError(f"unknown set {name!r}; known: {tuple(SHARED_SETS)}")
        folder, convert = SHARED_SETS[name]
        src = Path(data_root) / folder
        kw = {"chat": chat}
        if convert is cls_to_generation:
            kw["labels"] = sorted({ex.label for ex in read_classification(src / "train.txt")})
        out[name] = {}
        for split in SPLITS:
            records = convert(src / f"{split}.txt", **kw)
            out[name][split] = write_jsonl(records[:max_examples], Path(out_dir) / name / f"{split}.jsonl")
    return out


__all__ = ["GenerationExample", "build_shared_sets", "cls_to_generation", "collate", "encode_generation",
           "entity_spans", "ner_to_generation", "prompt_ids", "read_generation", "render_prompt", "write_jsonl"]
