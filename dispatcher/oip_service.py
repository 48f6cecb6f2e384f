"""Open Inference Protocol (KServe v2) servicer, so stock clients (tritonclient.grpc, KServe) work unchanged.

Models
  model_name = "<tenant>/<adapter>". The tenant part must be the authenticated tenant's name
  (PERMISSION_DENIED otherwise, before anything is looked up: a key never learns whether another
  tenant's adapter exists). "<tenant>/default" is the bare backbone (embeddings).
  model_version: "" = the active version; a number must be the active version (NOT_FOUND otherwise;
  older versions are not served, activate one with the admin API). The response's model_version is
  the version that served the call ("0" for the bare backbone).

Tensors (ModelMetadata says the same; platform "vbert")
  input   "text"      BYTES [n] or [n, 1]   UTF-8 strings, 1 <= n <= max_texts_per_request; the only
                                            input may have another name
  classify "label"    BYTES [n]             the best label
           "scores"   FP32  [n, C]          softmax, in the head's label order; the label names are
                                            in the output's parameter "labels" (a JSON list). With the
                                            classification extension (tritonclient's
                                            InferRequestedOutput("scores", class_count=k)): BYTES
                                            [n, k], "score:index:label", best first
  tag      "tags"     BYTES [n]             per text, JSON: [{"token", "label", "score",
                                            "start_char", "end_char"}, ...]
           "entities" BYTES [n]             per text, JSON: [{"label", "text", "start_token",
                                            "end_token", "score", "start_char", "end_char"}, ...]
                                            (IOB2 spans over words, aggregated as the HF pipeline's
                                            aggregation_strategy="first"); start_char/end_char:
                                            character offsets into the text (end exclusive), -1 for
                                            special tokens; an entity's "text" is the text's own
                                            characters text[start_char:end_char] (tenant.proto)
  embed    "embedding" FP32 [n, H]
  Outputs come back in raw_output_contents (FP32 little-endian; BYTES as 4-byte little-endian
  length + bytes per element), all of the head's outputs unless some are requested (an unknown
  name is INVALID_ARGUMENT). Inputs may come in raw_input_contents or contents.bytes_contents.

Request parameters: "truncate" (bool, default true: cut long texts; false: INVALID_ARGUMENT for a
text above the token limit), "normalize" (bool, embed heads only: override the head's setting).
Other parameters (e.g. Triton's "timeout", "priority") are ignored; the deadline is the call's gRPC
deadline, capped at default_deadline_s. Rate limits count one text as one request, as in the
tenant API.
"""
from __future__ import annotations

import asyncio
import importlib.metadata
import json
import struct
from dataclasses import dataclass
from typing import Callable

import torch

from manager.errors import InvalidArgumentError, NotFoundError, PermissionDeniedError
from manager.manager import ENCODER, AdapterRef, require_backbone
from manager.records import Tenant
from vbert.heads import HeadKind, HeadSpec

from . import convert
from .app import App
from .auth import current_tenant
from .rpc import run_inputs, unary
from .gen.inference import grpc_service_pb2 as pb
from .gen.inference import grpc_service_pb2_grpc

SERVER_NAME = PLATFORM = "vbert"
TEXT_INPUT = "text"
METHOD = "ModelInfer"
CLASSIFICATION_PARAM = "classification"      # Triton's classification extension (class_count)
SHARED_MEMORY_PARAM = "shared_memory_region"


def _server_version() -> str:
    try:
        return importlib.metadata.version("vbert-serve")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# -- tensors -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]

    def metadata(self) -> pb.ModelMetadataResponse.TensorMetadata:
        return pb.ModelMetadataResponse.TensorMetadata(name=self.name, datatype=self.datatype, shape=self.shape)


@dataclass
class OutputTensor:
    datatype: str
    shape: tuple[int, ...]
    raw: bytes
    parameters: dict[str, str]


INPUT_SPEC = TensorSpec(TEXT_INPUT, "BYTES", (-1,))
# head kind -> (head, hidden size) -> its output tensors
OUTPUT_SPECS: dict[HeadKind, Callable[[HeadSpec, int], tuple[TensorSpec, ...]]] = {
    HeadKind.CLASSIFY: lambda head, hidden: (TensorSpec("label", "BYTES", (-1,)),
                                             TensorSpec("scores", "FP32", (-1, head.num_labels))),
    HeadKind.TAG: lambda head, hidden: (TensorSpec("tags", "BYTES", (-1,)), TensorSpec("entities", "BYTES", (-1,))),
    HeadKind.EMBED: lambda head, hidden: (TensorSpec("embedding", "FP32", (-1, hidden)),),
}


def encode_bytes_tensor(items: list[bytes]) -> bytes:
    """The KServe/Triton raw BYTES layout: per element a 4-byte little-endian length, then the bytes."""
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def decode_bytes_tensor(raw: bytes, what: str) -> list[bytes]:
    out, i, n = [], 0, len(raw)
    while i < n:
        if i + 4 > n:
            raise InvalidArgumentError(f"{what}: raw BYTES contents end inside a 4-byte length prefix at byte {i}")
        (length,) = struct.unpack_from("<I", raw, i)
        i += 4
        if i + length > n:
            raise InvalidArgumentError(f"{what}: raw BYTES element {len(out)} claims {length} bytes, "
                                       f"only {n - i} remain")
        out.append(raw[i:i + length])
        i += length
    return out


def _fp32(values: torch.Tensor) -> OutputTensor:
    arr = values.detach().float().cpu().numpy().astype("<f4", copy=False)
    return OutputTensor("FP32", tuple(arr.shape), arr.tobytes(), {})


def _strings(items: list[str], shape: tuple[int, ...] | None = None) -> OutputTensor:
    return OutputTensor("BYTES", shape or (len(items),), encode_bytes_tensor([s.encode() for s in items]), {})


# -- request parsing -----------------------------------------------------------------------------
def split_model_name(model_name: str, tenant: Tenant) -> str:
    """The adapter name of "<tenant>/<adapter>"; the tenant part must be the caller's."""
    owner, sep, adapter = model_name.partition("/")
    if not sep or not owner or not adapter or "/" in adapter:
        raise InvalidArgumentError(f"model name {model_name!r} must be '<tenant>/<adapter>' "
                                   f"(e.g. '{tenant.name}/default')")
    if owner != tenant.name:
        raise PermissionDeniedError(f"model {model_name!r} belongs to another tenant; this key is tenant "
                                    f"{tenant.name!r}'s")
    return adapter


def check_version(model_name: str, version: str, ref: AdapterRef) -> None:
    if version and version != str(ref.version):
        raise NotFoundError(f"model {model_name!r} version {version!r} is not served: the active version is "
                            f"{ref.version}")


def texts_of(request: pb.ModelInferRequest, max_texts: int) -> list[str]:
    """The strings of the one BYTES input, validated: shape [n] or [n, 1], 1 <= n <= max_texts, none empty."""
    if len(request.inputs) != 1:
        names = [t.name for t in request.inputs]
        raise InvalidArgumentError(f"{len(names)} inputs {names}: this model takes exactly one BYTES input "
                                   f"named {TEXT_INPUT!r}")
    tensor = request.inputs[0]
    what = f"input {tensor.name!r}"
    if SHARED_MEMORY_PARAM in tensor.parameters:
        raise InvalidArgumentError(f"{what}: shared memory is not supported; send the data in the request")
    if tensor.datatype != "BYTES":
        raise InvalidArgumentError(f"{what} has datatype {tensor.datatype or '(none)'}; it must be BYTES "
                                   f"(UTF-8 strings)")
    shape = list(tensor.shape)
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or shape[0] < 0:
        raise InvalidArgumentError(f"{what} has shape {shape}; it must be [n] or [n, 1]")
    n = shape[0]
    if n == 0:
        raise InvalidArgumentError(f"{what} is empty (shape {shape}): send at least one text")
    if n > max_texts:
        raise InvalidArgumentError(f"{what} has {n} texts, above the limit of {max_texts} per request")
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise InvalidArgumentError(f"{len(request.raw_input_contents)} raw_input_contents for 1 input")
        if tensor.HasField("contents"):
            raise InvalidArgumentError(f"{what} has both raw_input_contents and contents; send one")
        items = decode_bytes_tensor(request.raw_input_contents[0], what)
    elif tensor.contents.bytes_contents:
        items = list(tensor.contents.bytes_contents)
    else:
        raise InvalidArgumentError(f"{what} has no data: set raw_input_contents or contents.bytes_contents")
    if len(items) != n:
        raise InvalidArgumentError(f"{what} has shape {shape} but {len(items)} elements")
    texts = []
    for i, item in enumerate(items):
        try:
            text = item.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidArgumentError(f"{what} element {i} is not valid UTF-8") from None
        if not text.strip():
            raise InvalidArgumentError(f"{what} element {i} is empty")
        texts.append(text)
    return texts


def bool_param(params, name: str) -> bool | None:
    if name not in params:
        return None
    p = params[name]
    if p.WhichOneof("parameter_choice") != "bool_param":
        raise InvalidArgumentError(f"parameter {name!r} must be a bool, got {p.WhichOneof('parameter_choice')}")
    return p.bool_param


def requested_outputs(request: pb.ModelInferRequest, specs: tuple[TensorSpec, ...]) -> list[tuple[str, int]]:
    """(name, classification top-k or 0) per requested output, in the request's order; all if none."""
    names = [s.name for s in specs]
    if not request.outputs:
        return [(name, 0) for name in names]
    out, seen = [], set()
    for o in request.outputs:
        if o.name not in names:
            raise InvalidArgumentError(f"unknown output {o.name!r} for model {request.model_name!r}: it has {names}")
        if SHARED_MEMORY_PARAM in o.parameters:
            raise InvalidArgumentError(f"output {o.name!r}: shared memory is not supported")
        k = 0
        if CLASSIFICATION_PARAM in o.parameters:
            if o.name != "scores":
                raise InvalidArgumentError(f"output {o.name!r}: the classification parameter applies to 'scores'")
            p = o.parameters[CLASSIFICATION_PARAM]
            which = p.WhichOneof("parameter_choice")
            k = getattr(p, which) if which in ("int64_param", "uint64_param") else 0
            if k < 1:
                raise InvalidArgumentError(f"output {o.name!r}: parameter 'classification' must be a positive integer")
        if o.name not in seen:
            seen.add(o.name)
            out.append((o.name, k))
    return out


# -- outputs per head kind -----------------------------------------------------------------------
def classify_outputs(completions, reqs, want: dict[str, int], _) -> dict[str, OutputTensor]:
    labels = list(completions[0].output.labels)
    probs = torch.softmax(torch.stack([c.output.logits.float() for c in completions]), -1)   # [n, C]
    out = {"label": _strings([labels[i] for i in probs.argmax(-1).tolist()])}
    k = want.get("scores", 0)
    if k:
        k = min(k, len(labels))
        top, idx = probs.topk(k, -1)                                                           # [n, k]
        out["scores"] = _strings([f"{s:f}:{i}:{labels[i]}" for row_s, row_i in zip(top.tolist(), idx.tolist())
                                  for s, i in zip(row_s, row_i)], (len(completions), k))
    else:
        out["scores"] = _fp32(probs)
        out["scores"].parameters["labels"] = json.dumps(labels)
    return out


def tag_outputs(completions, reqs, want: dict[str, int], tokenizer_and_special) -> dict[str, OutputTensor]:
    tokenizer, special = tokenizer_and_special
    tags, entities = [], []
    for c, r in zip(completions, reqs):
        t = convert.tagging_of(c.output, r, tokenizer, special)
        tags.append(json.dumps([{"token": x.token, "label": x.label, "score": x.score, "start_char": x.start_char,
                                 "end_char": x.end_char} for x in t.tokens]))
        entities.append(json.dumps([{"label": e.label, "text": e.text, "start_token": e.start_token,
                                     "end_token": e.end_token, "score": e.score, "start_char": e.start_char,
                                     "end_char": e.end_char} for e in t.entities]))
    return {"tags": _strings(tags), "entities": _strings(entities)}


def embed_outputs(completions, reqs, want: dict[str, int], _) -> dict[str, OutputTensor]:
    return {"embedding": _fp32(torch.stack([c.output.embedding.float() for c in completions]))}   # [n, H]


OUTPUTS_OF = {HeadKind.CLASSIFY: classify_outputs, HeadKind.TAG: tag_outputs, HeadKind.EMBED: embed_outputs}


class InferenceServicer(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, app: App):
        self.app = app
        tok = app.model.tokenizer if app.model is not None else None
        self._tag_context = (tok, set(tok.all_special_tokens) if tok is not None else set())
        self._version = _server_version()

    # -- server level (public) ---------------------------------------------------------------
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self._is_ready())

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=self._version, extensions=[])

    # -- model level (tenant key) ------------------------------------------------------------
    @unary
    async def ModelReady(self, request, context):
        try:
            ref = await self._resolve(request.name)
            check_version(request.name, request.version, ref)
        except NotFoundError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self._is_ready())

    @unary
    async def ModelMetadata(self, request, context):
        ref = await self._resolve(request.name)
        check_version(request.name, request.version, ref)
        specs = OUTPUT_SPECS[ref.head.kind](ref.head, self.app.model.spec.hidden_size)
        return pb.ModelMetadataResponse(name=request.name, versions=[str(ref.version)], platform=PLATFORM,
                                        inputs=[INPUT_SPEC.metadata()], outputs=[s.metadata() for s in specs])

    @unary
    async def ModelInfer(self, request, context):
        return await self._infer(request, context)

    # -- the work ----------------------------------------------------------------------------
    def _is_ready(self) -> bool:
        return self.app.is_accepting

    async def _resolve(self, model_name: str) -> AdapterRef:
        tenant = current_tenant()
        self.app.require_encoder("the Open Inference Protocol")
        adapter = split_model_name(model_name, tenant)
        ref = await asyncio.to_thread(self.app.manager.resolve, tenant, adapter)
        require_backbone(ref, ENCODER, "the Open Inference Protocol")
        return ref

    async def _infer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        app = self.app
        ref = await self._resolve(request.model_name)
        check_version(request.model_name, request.model_version, ref)
        kind = ref.head.kind
        texts = texts_of(request, app.config.max_texts_per_request)
        truncate = bool_param(request.parameters, "truncate")
        normalize = bool_param(request.parameters, "normalize")
        if normalize is not None and kind is not HeadKind.EMBED:
            raise InvalidArgumentError(f"parameter 'normalize' applies to embed heads; model "
                                       f"{request.model_name!r} has a {kind.value} head")
        wanted = requested_outputs(request, OUTPUT_SPECS[kind](ref.head, app.model.spec.hidden_size))
        completions, reqs = await run_inputs(app, context.time_remaining(), current_tenant(), ref,
                                             [(t, None) for t in texts],
                                             truncate=truncate is not False, normalize=normalize, method=METHOD)
        tensors = OUTPUTS_OF[kind](completions, reqs, dict(wanted), self._tag_context)
        response = pb.ModelInferResponse(model_name=request.model_name, model_version=str(ref.version), id=request.id)
        for name, _ in wanted:
            t = tensors[name]
            out = response.outputs.add(name=name, datatype=t.datatype, shape=t.shape)
            for key, value in t.parameters.items():
                out.parameters[key].string_param = value
            response.raw_output_contents.append(t.raw)
        return response
