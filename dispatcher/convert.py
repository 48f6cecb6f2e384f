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


def tagging(out: RowOutput, tokens: list[str], special: set[str]) -> tenant_pb2.Tagging:
    probs = torch.softmax(out.logits.float(), -1)               # [L, C]
    scores, best = probs.max(-1)
    labels = [out.labels[i] for i in best.tolist()]
    result = tenant_pb2.Tagging(tokens=[tenant_pb2.TokenTag(token=t, label=lab, score=float(s))
                                        for t, lab, s in zip(tokens, labels, scores.tolist())])
    for start, end, kind in iob2_spans(labels, [t in special for t in tokens]):
        text = ""
        for t in tokens[start:end]:
            text += t[2:] if t.startswith("##") else (" " + t if text else t)
        result.entities.append(tenant_pb2.Entity(label=kind, text=text, start_token=start, end_token=end,
                                                 score=float(scores[start:end].mean())))
    return result


def iob2_spans(labels: list[str], skip: list[bool]) -> list[tuple[int, int, str]]:
    """Entity spans (start, end exclusive, type) from IOB2 tags; an I- without a matching open
    span starts one (lenient, as seqeval's default); special tokens close spans."""
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
