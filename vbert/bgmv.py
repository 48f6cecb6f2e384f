"""Per-token LoRA over a stacked adapter bank (Punica's BGMV, shrink and expand fused), two backends.

Bank layout of one input group g (targets reading the same input, e.g. q, k, v) in one layer:
  a      [num_slots, G * R, in]          row j*R + r = row r of target j's A (zero-padded past its rank)
  b      [num_slots, sum_j R * out_j]    target j's B^T [R, out_j] flattened at b_offsets[j] (pre-scaled)
  ranks  [num_slots, G] int32            the real rank of target j in each slot (rows past it are zero)
a and b are float32 or bfloat16 (resolve_bank_dtype; the products are float32 either way).
Semantics: for each token i with s = idx[i] != 0 and each target j,
  out[i, out_offsets[j]:out_offsets[j] + out_j] += (a[s, jR:jR+R] @ x[i]) @ b_j[s]     (slot 0 adds nothing)

- "numba" (CPU): one fused kernel, tokens in parallel, reading each token's adapter rows in place: no
  gathered copy of the adapter, and only the rows up to the slot's real rank. In decode with a batch of
  distinct adapters, reading those rows is about half the kernel's time on this project's CPU
  (benchmarks/decode_lora.py). float32 or bfloat16 banks (bfloat16 widened to float32 by a shift here).
- "torch" (any device): gather each token's bank rows (index_select) and batched matmuls; on CUDA the
  gather is cheap next to the step, and it needs no custom kernel.
"""
from __future__ import annotations

import threading

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

BGMV_BACKENDS = ("numba", "torch")
_NUMBA_LOCK = threading.Lock()   # numba's workqueue threading layer (its fallback) allows one launch at a time
BANK_DTYPES = ("auto", "float32", "bfloat16")


@intrinsic
def _f32(typingctx, v):   # pragma: no cover (compiled)
    """A bank element as float32: float32 unchanged; a uint16 holds bfloat16 bits (the upper half of a
    float32), widened by a shift: exact, and it vectorizes (numba has no float16 or bfloat16 type on CPU)."""
    if isinstance(v, types.Float) and v.bitwidth == 32:
        return types.float32(v), lambda context, builder, sig, args: args[0]
    if isinstance(v, types.Integer) and v.bitwidth == 16 and not v.signed:
        def widen(context, builder, sig, args):
            bits = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
            return builder.bitcast(bits, ir.FloatType())
        return types.float32(v), widen
    return None


@numba.njit(parallel=True, fastmath=True, nogil=True, cache=True)
def _bgmv_numba(x, a, b, ranks, idx, out, out_offsets, out_dims, b_offsets, max_rank):   # pragma: no cover
    n, fin = x.shape
    groups = out_dims.shape[0]
    for i in numba.prange(n):
        s = idx[i]
        if s == 0:
            continue
        xi, oi = x[i], out[i]
        for j in range(groups):
            od, oo, bo = out_dims[j], out_offsets[j], b_offsets[j]
            rank, row0 = ranks[s, j], j * max_rank
            r = 0
            while r + 8 <= rank:              # eight, then four, then one rank rows at a time: x and
                # this token's out row are read once per block
                a0, a1, a2, a3 = a[s, row0 + r], a[s, row0 + r + 1], a[s, row0 + r + 2], a[s, row0 + r + 3]
                a4, a5, a6, a7 = a[s, row0 + r + 4], a[s, row0 + r + 5], a[s, row0 + r + 6], a[s, row0 + r + 7]
                s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = np.float32(0.0)
                for k in range(fin):
                    xk = xi[k]
                    s0 += _f32(a0[k]) * xk
                    s1 += _f32(a1[k]) * xk
                    s2 += _f32(a2[k]) * xk
                    s3 += _f32(a3[k]) * xk
                    s4 += _f32(a4[k]) * xk
                    s5 += _f32(a5[k]) * xk
                    s6 += _f32(a6[k]) * xk
                    s7 += _f32(a7[k]) * xk
                bb = b[s, bo + r * od:bo + (r + 8) * od]
                for c in range(od):
                    oi[oo + c] += (s0 * _f32(bb[c]) + s1 * _f32(bb[od + c]) + s2 * _f32(bb[2 * od + c])
                                   + s3 * _f32(bb[3 * od + c]) + s4 * _f32(bb[4 * od + c])
                                   + s5 * _f32(bb[5 * od + c]) + s6 * _f32(bb[6 * od + c])
                                   + s7 * _f32(bb[7 * od + c]))
                r += 8
            while r + 4 <= rank:
                a0, a1, a2, a3 = a[s, row0 + r], a[s, row0 + r + 1], a[s, row0 + r + 2], a[s, row0 + r + 3]
                s0 = s1 = s2 = s3 = np.float32(0.0)
                for k in range(fin):
                    xk = xi[k]
                    s0 += _f32(a0[k]) * xk
                    s1 += _f32(a1[k]) * xk
                    s2 += _f32(a2[k]) * xk
                    s3 += _f32(a3[k]) * xk
                b0 = b[s, bo + r * od:bo + (r + 1) * od]
                b1 = b[s, bo + (r + 1) * od:bo + (r + 2) * od]
                b2 = b[s, bo + (r + 2) * od:bo + (r + 3) * od]
                b3 = b[s, bo + (r + 3) * od:bo + (r + 4) * od]
                for c in range(od):
                    oi[oo + c] += s0 * _f32(b0[c]) + s1 * _f32(b1[c]) + s2 * _f32(b2[c]) + s3 * _f32(b3[c])
                r += 4
            while r < rank:
                arow = a[s, row0 + r]
                acc = np.float32(0.0)
                for k in range(fin):
                    acc += _f32(arow[k]) * xi[k]
                brow = b[s, bo + r * od:bo + (r + 1) * od]
                for c in range(od):
                    oi[oo + c] += acc * _f32(brow[c])
                r += 1


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """"auto": numba for float32 CPU compute, else torch. ValueError for an unknown or impossible choice."""
    if backend == "auto":
        return "numba" if device.type == "cpu" and dtype == torch.float32 else "torch"
    if backend not in BGMV_BACKENDS:
        raise ValueError(f"unknown LoRA backend {backend!r}; one of {BGMV_BACKENDS} or 'auto'")
    if backend == "numba" and (device.type != "cpu" or dtype != torch.float32):
        raise ValueError(f"the numba LoRA backend needs float32 CPU compute, got {dtype} on {device}")
    return backend


def resolve_bank_dtype(bank_dtype: str, backend: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype the banks are stored in: "auto" is the compute dtype; "bfloat16" halves a float32 pool
    (A and scale * B rounded to nearest; products in the compute dtype). On this project's CPU the numba
    kernel is as fast with either out of cache (benchmarks/decode_lora.py), a little slower with bfloat16
    when the rows sit in cache (the widening costs instructions)."""
    if bank_dtype not in BANK_DTYPES:
        raise ValueError(f"unknown LoRA bank dtype {bank_dtype!r}; one of {BANK_DTYPES}")
    if bank_dtype == "auto":
        return dtype
    return torch.float32 if bank_dtype == "float32" else torch.bfloat16


def _numba_array(t: torch.Tensor) -> np.ndarray:
    """A CPU bank as the kernel reads it: float32 as is, bfloat16 as its uint16 bits (no copy)."""
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


def bgmv(backend: str, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, ranks: np.ndarray, idx: torch.Tensor,
         out: torch.Tensor, out_offsets: np.ndarray, out_dims: np.ndarray, b_offsets: np.ndarray,
         max_rank: int) -> torch.Tensor:
    """out += per-token LoRA of one group (module docstring). x [n, in], a [S, G*R, in], b [S, sum R*out_j]
    (float32 or bfloat16, computed in x's dtype), ranks [S, G] int32 (host), idx [n] long, out [n, W] (written
    in place, also returned)."""
    if backend == "numba":
        with _NUMBA_LOCK:
            _bgmv_numba(x.contiguous().numpy(), _numba_array(a), _numba_array(b), ranks, idx.numpy(), out.numpy(),
                        out_offsets, out_dims, b_offsets, max_rank)
        return out
    xa = torch.bmm(a.index_select(0, idx).to(x.dtype), x.unsqueeze(-1)).squeeze(-1)     # [n, G*R]
    for j in range(len(out_dims)):
        od, oo, bo = int(out_dims[j]), int(out_offsets[j]), int(b_offsets[j])
        bj = b[:, bo:bo + max_rank * od].view(-1, max_rank, od).index_select(0, idx).to(x.dtype)   # [n, R, out_j]
        out[:, oo:oo + od] += torch.bmm(xa[:, j * max_rank:(j + 1) * max_rank].unsqueeze(1), bj).squeeze(1)
    return out
