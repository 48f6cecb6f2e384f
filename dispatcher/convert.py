"""Protobuf <-> domain conversion for the tenant API (the only place that knows both)."""
from __future__ import annotations

import math

import torch

from manager.errors import InvalidArgumentError
from vbert.model import RowOutput

from .gen.vbert.v1 import tenant_pb2


def inputs_of(request, max_inputs: int, vocab_size: int) -> list[tuple[str | None, list[int] | None]]:
    """(text, token_ids) per input, validated: at least one, at most max_inputs, none empty."""
    if not request.inputs:
        raise InvalidArgumentError("no inputs: give at least one text or token_ids")
    if len(request.inputs) > max_inputs:
        raise InvalidArgumentError(f"{len(request.inputs)} inputs, above the limit of {max_inputs} per request")
    out = []
    for i, item in enumerate(request.inputs):
        which = item.WhichOneof("input")
        if which == "text":
            if not item.text.strip():
                raise InvalidArgumentError(f"input {i}: text is empty")
            out.append((item.text, None))
        elif which == "token_ids":
            ids = list(item.token_ids.ids)
            if not ids:
                raise InvalidArgumentError(f"input {i}: token_ids is empty")
            bad = [t for t in ids if t >= vocab_size]
            if bad:
                raise InvalidArgumentError(f"input {i}: token id {bad[0]} is outside the vocabulary of {vocab_size}")
            out.append((None, ids))
        else:
            raise InvalidArgumentError(f"input {i}: set either text or token_ids")
    return out


def fit_ids(ids: list[int], limit: int, truncate: bool, index: int) -> list[int]:
    if len(ids) <= limit:
        return ids
    if not truncate:
        raise InvalidArgumentError(f"input {index} has {len(ids)} tokens, above the limit of {limit} "
                                   f"(truncation is REJECT)")
    return ids[:limit - 1] + ids[-1:]


def classification(out: RowOutput, top_k: int) -> tenant_pb2.Classification:
    probs = torch.softmax(out.logits.float(), -1)
    order = torch.argsort(probs, descending=True).tolist()
    if top_k:
        order = order[:top_k]
    return tenant_pb2.Classification(
        label=out.labels[order[0]],
        scores=[tenant_pb2.LabelScore(label=out.labels[i], score=float(probs[i])) for i in order])


NO_CHAR = -1   # start_char / end_char of a token with no characters in the caller's text (see tenant.proto)


def tagging_of(out: RowOutput, request, tokenizer, special: set[str]) -> tenant_pb2.Tagging:
    """`tagging` of an engine request: its token ids, and for a text input, its text and the
    offsets and word indices the runner put in its metadata (scheduler.runner.ModelRunner.tokenize)."""
    text = request.text if "offsets" in request.metadata else None
    special = special - {tokenizer.unk_token}        # [UNK] stands for a word of the input, as in a text
    return tagging(out, tokenizer.convert_ids_to_tokens(request.prompt_ids), special, text=text,
                   offsets=request.metadata.get("offsets"), word_ids=request.metadata.get("word_ids"))


def tagging(out: RowOutput, tokens: list[str], special: set[str], *, text: str | None = None,
            offsets: list[tuple[int, int]] | None = None,
            word_ids: list[int | None] | None = None) -> tenant_pb2.Tagging:
    """Per-token labels and the entities, aggregated as the Hugging Face pipeline's
    aggregation_strategy="first" (training labels only a word's first sub-token): a word takes the
    label and score of its first sub-token, whatever its continuation pieces predict; IOB2 spans
    are found over words, and an entity covers its words' every sub-token. Words are the
    tokenizer's pre-tokenized words (word_ids) for a text, runs of "##" pieces for token ids.
    With `text` and `offsets` (a text input): each token's and entity's character span in the text,
    and the entity's text cut from it; otherwise NO_CHAR and the word pieces joined."""
    probs = torch.softmax(out.logits.float(), -1)               # [L, C]
    scores, best = probs.max(-1)
    scores = scores.tolist()
    labels = [out.labels[i] for i in best.tolist()]
    has_chars = text is not None and offsets is not None and word_ids is not None
    if has_chars:
        is_special = [w is None for w in word_ids]
        chars = [(NO_CHAR, NO_CHAR) if sp else (int(a), int(b)) for sp, (a, b) in zip(is_special, offsets)]
    else:
        is_special = [t in special for t in tokens]
        chars = [(NO_CHAR, NO_CHAR)] * len(tokens)
    result = tenant_pb2.Tagging(tokens=[
        tenant_pb2.TokenTag(token=t, label=lab, score=s, start_char=a, end_char=b)
        for t, lab, s, (a, b) in zip(tokens, labels, scores, chars)])
    words = _words(tokens, is_special, word_ids if has_chars else None)      # token positions per word
    word_skip = [is_special[w[0]] for w in words]
    for first, last, kind in iob2_spans([labels[w[0]] for w in words], word_skip):
        start, end = words[first][0], words[last - 1][-1] + 1
        if has_chars:
            start_char, end_char = chars[start][0], chars[end - 1][1]
            span = text[start_char:end_char]
        else:
            start_char = end_char = NO_CHAR
            span = ""
            for t in tokens[start:end]:
                span += t[2:] if t.startswith("##") else (" " + t if span else t)
        score = sum(scores[w[0]] for w in words[first:last]) / (last - first)
        result.entities.append(tenant_pb2.Entity(label=kind, text=span, start_token=start, end_token=end, score=score,
                                                 start_char=start_char, end_char=end_char))
    return result


def _words(tokens: list[str], is_special: list[bool], word_ids: list[int | None] | None) -> list[list[int]]:
    """Token positions grouped by word: a special token alone; a token continues the word before it
    if it has the same word index (or, without word indices, if it is a "##" continuation piece)."""
    words: list[list[int]] = []
    for i, t in enumerate(tokens):
        prev = i - 1
        continues = (words and not is_special[i] and not is_special[prev]
                     and (word_ids[i] == word_ids[prev] if word_ids is not None else t.startswith("##")))
        if continues:
            words[-1].append(i)
        else:
            words.append([i])
    return words


def iob2_spans(labels: list[str], skip: list[bool]) -> list[tuple[int, int, str]]:
    """Entity spans (start, end exclusive, type) over positions (tokens, or words as `tagging` uses
    it) from IOB2 tags; an I- without a matching open span starts one (lenient, as seqeval's
    default); special tokens close spans."""
    spans, start, kind = [], None, None
    for i, (lab, is_special) in enumerate(zip(labels + ["O"], skip + [True])):
        prefix, _, typ = lab.partition("-") if "-" in lab else (lab, "", "")
        continues = not is_special and prefix == "I" and kind == typ and start is not None
        if start is not None and not continues:
            spans.append((start, i, kind))
            start, kind = None, None
        if not is_special and prefix in ("B", "I") and start is None:
            start, kind = i, typ
    return spans


def embedding(out: RowOutput) -> tenant_pb2.Embedding:
    return tenant_pb2.Embedding(values=out.embedding.float().tolist())


def metadata(completions, total_s: float, version: int) -> tenant_pb2.Metadata:
    def ms(x: float) -> float:
        return 0.0 if math.isnan(x) else x * 1000

    return tenant_pb2.Metadata(
        num_tokens=sum(c.num_tokens for c in completions),
        queue_ms=ms(max(c.queue_s for c in completions)), tokenization_ms=ms(max(c.tokenize_s for c in completions)),
        inference_ms=ms(max(c.inference_s for c in completions)), total_ms=ms(total_s), adapter_version=version)
