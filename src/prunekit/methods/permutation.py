"""Channel permutation for N:M masks (as in RIA, Zhang et al. ICLR 2024): spread the large scores over the groups.

An N:M mask keeps the N highest scores of every group of M consecutive inputs of each row, so two large
scores that share a group cost one of them. Reordering a layer's input channels (and the rows of the
layers that produce them, so the model computes the same function) puts the large ones in different groups.

:func:`channel_permutation` chooses the order for a score matrix (out, in), maximising the total score the
N:M mask keeps:

1. *balanced greedy*: channels sorted by their total score are dealt to the groups in snake order
   (group 0, 1, ..., G-1, then G-1, ..., 0, ...), so every group gets one channel of each tier;
2. *linear-sum-assignment refinement*: for each slot s of the M slots of a group in turn, the G channels
   in slot s are taken out and put back by an optimal assignment (``scipy.optimize.linear_sum_assignment``)
   to the G groups. With the other M-1 channels of group g fixed, the kept score of a row of g with
   channel c added is (sum of the top N-1 of the others) + max(N-th highest of the others, score of c),
   so the assignment's gain matrix is gain[c, g] = sum over rows of max(o_N[row, g], S[row, c]). The
   current placement is one of the assignments, so no step lowers the kept score. Passes over the M slots
   repeat until a pass gains less than ``tolerance`` (relative) or ``passes`` is reached.

The order is a permutation of the input channels: new channel i is old channel ``order[i]``.
"""

from __future__ import annotations

from typing import Any

import torch

from prunekit.errors import PrunekitError
from prunekit.masks import Structure, nm_mask

CHUNK_ELEMENTS = 1 << 23  # elements of the (rows, chunk, groups) temporary in the gain matrix


def kept_score(scores: torch.Tensor, structure: Structure) -> float:
    """Total score the N:M mask keeps (the top N of every group of M consecutive inputs of each row)."""
    return float((scores.float() * nm_mask(scores, structure)).sum())


def check_permute(config: Any) -> None:
    """Refuse a permutation that cannot help: it spreads scores over N:M groups, so it needs an N:M structure."""
    if getattr(config, "permute", False) and not config.structure_spec().is_nm:
        raise PrunekitError(f"{config.method}: permute reorders channels for an N:M mask, but the structure is "
                            f"{config.structure}: add --structure 2:4 or drop permute")


def balanced_greedy(scores: torch.Tensor, m: int) -> torch.Tensor:
    """(groups, m) channel indices: channels by total score, dealt to the groups in snake order."""
    channels = scores.shape[1]
    groups = channels // m
    ranked = torch.argsort(scores.float().sum(dim=0), descending=True, stable=True)
    table = torch.empty(groups, m, dtype=torch.long)
    for slot in range(m):
        tier = ranked[slot * groups:(slot + 1) * groups]
        table[:, slot] = tier if slot % 2 == 0 else tier.flip(0)
    return table


def _gain(others: torch.Tensor, candidates: torch.Tensor, n: int) -> torch.Tensor:
    """gain[c, g] = sum_rows max(N-th highest of others[:, g, :], candidates[:, c]); (candidates, groups)."""
    rows, groups, _ = others.shape
    nth = others.sort(dim=2, descending=True).values[:, :, n - 1]  # (rows, groups)
    count = candidates.shape[1]
    out = torch.empty(count, groups, dtype=torch.float32)
    step = max(1, CHUNK_ELEMENTS // max(1, rows * groups))
    for start in range(0, count, step):
        chunk = candidates[:, start:start + step]  # (rows, chunk)
        out[start:start + step] = torch.maximum(nth.unsqueeze(1), chunk.unsqueeze(2)).sum(dim=0)
    return out


def channel_permutation(scores: torch.Tensor, structure: Structure, passes: int = 4,
                        tolerance: float = 1e-4) -> tuple[torch.Tensor, dict[str, Any]]:
    """(order, facts): a channel order for an N:M mask of ``scores`` (out, in), and the kept score before/after."""
    from scipy.optimize import linear_sum_assignment

    if not structure.is_nm:
        raise PrunekitError("a channel permutation is for N:M structures: use --structure 2:4")
    scores = scores.detach().float().cpu()
    rows, channels = scores.shape
    n, m = structure.n, structure.m
    if channels % m:
        raise PrunekitError(f"{channels} input channels do not split into groups of {m}")
    groups = channels // m
    before = kept_score(scores, structure)
    table = balanced_greedy(scores, m)
    greedy = kept_score(scores[:, table.reshape(-1)], structure)
    if greedy < before:  # the identity is better than the greedy start: refine from it instead
        table = torch.arange(channels).reshape(groups, m)
    current = max(before, greedy)
    used = 0
    for _ in range(passes):
        start_pass = current
        for slot in range(m):
            rest = [s for s in range(m) if s != slot]
            others = scores[:, table[:, rest].reshape(-1)].reshape(rows, groups, m - 1)
            candidates = scores[:, table[:, slot]]  # (rows, groups): the channel now in this slot of each group
            gain = _gain(others, candidates, n)
            chosen, assigned = linear_sum_assignment(gain.double().numpy(), maximize=True)
            placed = torch.empty(groups, dtype=torch.long)
            placed[torch.as_tensor(assigned)] = table[torch.as_tensor(chosen), slot]
            table[:, slot] = placed
        used += 1
        current = kept_score(scores[:, table.reshape(-1)], structure)
        if current - start_pass <= tolerance * max(abs(start_pass), 1e-12):
            break
    order = table.reshape(-1)
    if current < before:  # cannot happen (each step keeps the current placement as a candidate); be safe
        order, current = torch.arange(channels), before
    return order, {"kept_score_before": before, "kept_score_after": current, "greedy": greedy, "passes": used}
