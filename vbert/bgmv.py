"""Per-token LoRA over a stacked adapter bank (Punica's BGMV, shrink and expand fused), two backends.

Bank layout of one input group g (targets reading the same input, e.g. q, k, v) in one layer:
  a      [num_slots, G * R, in]          row j*R + r = row r of target j's A (zero-padded past its rank)
  b      [num_slots, sum_j R * out_j]    target j's B^T [R, out_j] flattened at b_offsets[j] (pre-scaled)
  ranks  [num_slots, G] int32            the real rank of target j in each slot (rows past it are zero)
Semantics: for each token i with s = idx[i] != 0 and each target j,
  out[i, out_offsets[j]:out_offsets[j] + out_j] += (a[s, jR:jR+R] @ x[i]) @ b_j[s]     (slot 0 adds nothing)

- "numba" (CPU): one fused kernel, tokens in parallel, reading each token's adapter rows in place: no
  gathered copy of the adapter, and only the rows up to the slot's real rank. Decode of a batch of
  distinct adapters is memory-bound on those rows, so this is what keeps LoRA near the bare model's speed.
- "torch" (any device): gather each token's bank rows (index_select) and batched matmuls; on CUDA the
  gather is cheap next to the step, and it needs no custom kernel.
"""
from __future__ import annotations

import threading

import numba
import numpy as np
import torch

BGMV_BACKENDS = ("numba", "torch")
_NUMBA_LOCK = threading.Lock()   # numba's workqueue threading layer (its fallback) allows one launch at a time


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
                    s0 += a0[k] * xk
                    s1 += a1[k] * xk
                    s2 += a2[k] * xk
                    s3 += a3[k] * xk
                    s4 += a4[k] * xk
                    s5 += a5[k] * xk
                    s6 += a6[k] * xk
                    s7 += a7[k] * xk
                bb = b[s, bo + r * od:bo + (r + 8) * od]
                for c in range(od):
                    oi[oo + c] += (s0 * bb[c] + s1 * bb[od + c] + s2 * bb[2 * od + c] + s3 * bb[3 * od + c]
                                   + s4 * bb[4 * od + c] + s5 * bb[5 * od + c] + s6 * bb[6 * od + c]
                                   + s7 * bb[7 * od + c])
                r += 8
            while r + 4 <= rank:
                a0, a1, a2, a3 = a[s, row0 + r], a[s, row0 + r + 1], a[s, row0 + r + 2], a[s, row0 + r + 3]
                s0 = s1 = s2 = s3 = np.float32(0.0)
                for k in range(fin):
                    xk = xi[k]
                    s0 += a0[k] * xk
                    s1 += a1[k] * xk
                    s2 += a2[k] * xk
                    s3 += a3[k] * xk
                b0 = b[s, bo + r * od:bo + (r + 1) * od]
                b1 = b[s, bo + (r + 1) * od:bo + (r + 2) * od]
                b2 = b[s, bo + (r + 2) * od:bo + (r + 3) * od]
                b3 = b[s, bo + (r + 3) * od:bo + (r + 4) * od]
                for c in range(od):
                    oi[oo + c] += s0 * b0[c] + s1 * b1[c] + s2 * b2[c] + s3 * b3[c]
                r += 4
            while r < rank:
                arow = a[s, row0 + r]
                acc = np.float32(0.0)
                for k in range(fin):
                    acc += arow[k] * xi[k]
                brow = b[s, bo + r * od:bo + (r + 1) * od]
                for c in range(od):
                    oi[oo + c] += acc * brow[c]
                r += 1


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """"auto": numba for float32 CPU banks, else torch. ValueError for an unknown or impossible choice."""
    if backend == "auto":
        return "numba" if device.type == "cpu" and dtype == torch.float32 else "torch"
    if backend not in BGMV_BACKENDS:
        raise ValueError(f"unknown LoRA backend {backend!r}; one of {BGMV_BACKENDS} or 'auto'")
    if backend == "numba" and (device.type != "cpu" or dtype != torch.float32):
        raise ValueError(f"the numba LoRA backend needs float32 CPU banks, got {dtype} on {device}")
    return backend


def bgmv(backend: str, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, ranks: np.ndarray, idx: torch.Tensor,
         out: torch.Tensor, out_offsets: np.ndarray, out_dims: np.ndarray, b_offsets: np.ndarray,
         max_rank: int) -> torch.Tensor:
    """out += per-token LoRA of one group (module docstring). x [n, in], a [S, G*R, in], b [S, sum R*out_j],
    ranks [S, G] int32 (host), idx [n] long, out [n, W] (written in place, also returned)."""
    if backend == "numba":
        with _NUMBA_LOCK:
            _bgmv_numba(x.contiguous().numpy(), a.numpy(), b.numpy(), ranks, idx.numpy(), out.numpy(),
                        out_offsets, out_dims, b_offsets, max_rank)
        return out
    xa = torch.bmm(a.index_select(0, idx), x.unsqueeze(-1)).squeeze(-1)               # [n, G*R]
    for j in range(len(out_dims)):
        od, oo, bo = int(out_dims[j]), int(out_offsets[j]), int(b_offsets[j])
        bj = b[:, bo:bo + max_rank * od].view(-1, max_rank, od).index_select(0, idx)   # [n, R, out_j]
        out[:, oo:oo + od] += torch.bmm(xa[:, j * max_rank:(j + 1) * max_rank].unsqueeze(1), bj).squeeze(1)
    return out
