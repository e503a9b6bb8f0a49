"""Training-free mask refinement after any one-shot method: one-for-one swaps that lower the layer's output error.

In the spirit of DSnoT (Zhang et al., ICLR 2024: prune and regrow, no training) and SparseSwaps (2025:
swaps optimal for the layer's least-squares error from its Gram matrix). For a layer with dense weights
W0 and pruned weights W, the output error on the calibration inputs X is, row by row,
``e = dᵀ G d`` with ``d = w0 - w`` and ``G = XᵀX`` (the statistics the engine collects). With ``r = G d``:

* pruning a kept weight j (w_j -> 0) changes e by ``c_j = 2 w_j r_j + w_j² G_jj``;
* then regrowing a pruned weight i at its least-squares value ``t = r'_i / G_ii`` (``r' = r + w_j G[:, j]``,
  the residual after pruning j) changes e by ``-r'_i² / G_ii``.

So one swap changes e by ``Δ(i, j) = c_j - (r_i + w_j G_ij)² / G_ii`` exactly. Every row makes its best swap
with Δ < 0 each iteration (all rows at once): unstructured, i and j among the ``CANDIDATES`` best by their
single-sided terms; N:M, every (kept, pruned) pair inside each group of M (the N:M pattern is unchanged).
The count of kept weights per row never changes, so the sparsity stays exact. ``t`` equals w0_i when
nothing else in the row is pruned; otherwise it also absorbs the part of the error that input i can
explain (with a weight-updating method such as SparseGPT the kept weights are no longer w0 anyway).
Rows stop when no swap lowers their error; ``iterations`` bounds the swaps per row.
"""

from __future__ import annotations

from typing import Any

import torch

from prunekit.masks import Structure
from prunekit.methods.base import flat_inputs

CANDIDATES = 8  # unstructured: pruned and kept candidates per row whose exact pair changes are compared
RELATIVE_TOLERANCE = 1e-6  # a swap must lower the row's error by more than this fraction (float noise)


class GramObserver:
    """Collects XᵀX (float32, all of it) of one input stream; follows a reordering of the channels."""

    def __init__(self, in_features: int) -> None:
        self.gram: torch.Tensor | None = None
        self.in_features = in_features
        self.n_tokens = 0

    def add_batch(self, inputs: torch.Tensor) -> None:
        from prunekit.methods.sparsegpt import accumulate_upper

        rows = flat_inputs(inputs)
        if self.gram is None:
            self.gram = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float32, device=rows.device)
        accumulate_upper(self.gram, rows)
        self.n_tokens += rows.shape[0]

    def matrix(self) -> torch.Tensor:
        """The symmetric XᵀX."""
        from prunekit.methods.sparsegpt import symmetric_from_upper

        if self.gram is None:
            raise RuntimeError("refine: the layer received no calibration inputs")
        return symmetric_from_upper(self.gram)


def swap_refine(weight: torch.Tensor, dense: torch.Tensor, gram: torch.Tensor, structure: Structure,
                iterations: int) -> dict[str, Any]:
    """Refine ``weight`` (out, in; pruned, written in place) towards ``dense`` under ``gram``; facts for the record."""
    work = weight.detach().float().clone()
    dense = dense.detach().float().to(work.device)
    gram = gram.float().to(work.device)
    keep = work != 0
    diag = torch.diagonal(gram).clone()
    live = diag > 0  # dead inputs (never nonzero) cannot help: never regrown
    safe_diag = torch.where(live, diag, torch.ones_like(diag))
    residual = (dense - work) @ gram  # r = G d per row (G symmetric)
    before = ((dense - work) * residual).sum(dim=1)
    rows = torch.arange(work.shape[0], device=work.device)
    swaps = torch.zeros(work.shape[0], dtype=torch.long, device=work.device)
    active = torch.ones(work.shape[0], dtype=torch.bool, device=work.device)
    error = before.clone()  # kept up to date swap by swap (each swap changes it by exactly its Δ)
    for _ in range(iterations):
        if structure.is_nm:
            delta, i, j, t = _best_nm_swaps(work, keep, residual, gram, safe_diag, live, structure)
        else:
            delta, i, j, t = _best_swaps(work, keep, residual, gram, safe_diag, live)
        take = active & (delta < -RELATIVE_TOLERANCE * error.abs().clamp_min(1e-30))
        if not bool(take.any()):
            break
        active &= take  # a row that found nothing to gain is done
        r, i, j, t = rows[take], i[take], j[take], t[take]
        w_j = work[r, j]
        work[r, j] = 0.0
        keep[r, j] = False
        work[r, i] = t
        keep[r, i] = True
        # d_j grows by w_j, d_i shrinks by t: r += w_j G[j] - t G[i]
        residual[r] += w_j.unsqueeze(1) * gram[j] - t.unsqueeze(1) * gram[i]
        swaps[r] += 1
        error[r] += delta[take]
    after = ((dense - work) * ((dense - work) @ gram)).sum(dim=1)
    weight.copy_(work.to(weight.dtype))
    return {"swaps": int(swaps.sum()), "rows_swapped": int((swaps > 0).sum()), "max_swaps_row": int(swaps.max()),
            "error_before": float(before.sum()), "error_after": float(after.sum())}


def _best_swaps(work: torch.Tensor, keep: torch.Tensor, residual: torch.Tensor, gram: torch.Tensor,
                diag: torch.Tensor, live: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per row: (Δ, regrown i, pruned j, value t) of the best unstructured swap among the candidates."""
    k = min(CANDIDATES, work.shape[1])
    gain = residual.square() / diag
    gain = gain.masked_fill(keep | ~live, -torch.inf)
    cost = 2 * work * residual + work.square() * diag
    cost = cost.masked_fill(~keep, torch.inf)
    regrow = gain.topk(k, dim=1).indices  # (out, k)
    prune = (-cost).topk(k, dim=1).indices  # (out, k)
    r_i = residual.gather(1, regrow)  # (out, k)
    w_j = work.gather(1, prune)  # (out, k)
    c_j = cost.gather(1, prune)
    g_ij = gram[regrow.unsqueeze(2), prune.unsqueeze(1)]  # (out, k, k)
    numerator = r_i.unsqueeze(2) + w_j.unsqueeze(1) * g_ij
    d_i = diag[regrow].unsqueeze(2)
    delta = c_j.unsqueeze(1) - numerator.square() / d_i
    valid = torch.isfinite(gain.gather(1, regrow)).unsqueeze(2) & torch.isfinite(c_j).unsqueeze(1)
    delta = delta.masked_fill(~valid, torch.inf)
    best = delta.reshape(delta.shape[0], -1).argmin(dim=1)
    a, b = best // k, best % k
    rows = torch.arange(work.shape[0], device=work.device)
    t = (numerator / d_i)[rows, a, b]
    return delta.reshape(delta.shape[0], -1)[rows, best], regrow[rows, a], prune[rows, b], t


def _best_nm_swaps(work: torch.Tensor, keep: torch.Tensor, residual: torch.Tensor, gram: torch.Tensor,
                   diag: torch.Tensor, live: torch.Tensor, structure: Structure) -> tuple[torch.Tensor, ...]:
    """Per row: (Δ, regrown i, pruned j, value t) of the best swap inside one group of M (N:M kept)."""
    out, cols = work.shape
    n, m = structure.n, structure.m
    groups = cols // m
    shape = (out, groups, m)
    kept = keep.reshape(shape)
    # in every group, the positions of its N kept weights, then of its M - N pruned ones
    slots = kept.to(torch.uint8).argsort(dim=2, descending=True, stable=True)
    p, q = slots[:, :, :n], slots[:, :, n:]  # (out, groups, N) kept, (out, groups, M - N) pruned
    w_p = work.reshape(shape).gather(2, p)
    res = residual.reshape(shape)
    d = diag.reshape(1, groups, m).expand(out, groups, m)
    cost = 2 * w_p * res.gather(2, p) + w_p.square() * d.gather(2, p)  # pruning p
    r_q, d_q = res.gather(2, q), d.gather(2, q)
    block = gram.reshape(groups, m, groups, m).diagonal(dim1=0, dim2=2).permute(2, 0, 1).reshape(1, groups, m * m)
    pairs = (q.unsqueeze(2) * m + p.unsqueeze(3)).reshape(out, groups, -1)  # G[q, p] in the group's m x m block
    g_qp = block.expand(out, groups, m * m).gather(2, pairs).reshape(out, groups, n, m - n)
    # Δ[o, g, a, b] = cost_a - (r_b + w_a G_ba)² / G_bb for kept a, pruned b
    numerator = r_q.unsqueeze(2) + w_p.unsqueeze(3) * g_qp
    delta = cost.unsqueeze(3) - numerator.square() / d_q.unsqueeze(2)
    dead = ~live.reshape(1, groups, m).expand(out, groups, m).gather(2, q)
    delta = delta.masked_fill(dead.unsqueeze(2), torch.inf).reshape(out, -1)
    best = delta.argmin(dim=1)
    g, rest = best // (n * (m - n)), best % (n * (m - n))
    a, b = rest // (m - n), rest % (m - n)
    rows = torch.arange(out, device=work.device)
    t = numerator.reshape(out, -1)[rows, best] / d_q[rows, g, b]
    return delta[rows, best], g * m + q[rows, g, b], g * m + p[rows, g, a], t
