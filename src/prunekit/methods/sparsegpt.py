"""SparseGPT (Frantar & Alistarh 2023): prune with the OBS saliency and update the kept weights.

H = 2·XᵀX / n over the calibration tokens (accumulated in float32 with ``addmm_``; the algorithm is
invariant to the scale of H, so the token mean is used), dampened by ``dampening · mean(diag H)``
(×10 and retried while the Cholesky factorisation fails), dead inputs (H_jj = 0) get H_jj = 1 and
their weights zeroed. Hinv = upper Cholesky factor of H⁻¹ (factorised in float64). Columns are
processed in blocks of ``block_size``: the mask of a block is chosen by W²/diag(Hinv)² (the N:M
groups column group by column group), and each column's pruning error is spread onto the columns
not yet processed, so the kept weights reconstruct the layer's output.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from prunekit.adapters import weight_view
from prunekit.calibration import single_thread
from prunekit.errors import PrunekitError
from prunekit.masks import Structure, count_to_prune, nm_mask, prune_lowest
from prunekit.methods.base import LayerwiseMethod, flat_inputs

if TYPE_CHECKING:
    from prunekit.pruning import PruneConfig

MAX_DAMPENING_TRIES = 6


class SparseGPTMethod(LayerwiseMethod):
    """Hessian of the layer inputs, then the blocked OBS prune-and-update sweep."""

    name: ClassVar[str] = "sparsegpt"
    description: ClassVar[str] = "OBS saliency W^2/diag(H^-1)^2 with weight updates that reconstruct the output"
    settings: ClassVar[tuple[str, ...]] = ("sparsity", "structure", "allocation", "block_size", "dampening",
                                           "owl_m", "owl_lambda", "include", "exclude")
    compares: ClassVar[tuple[str, ...]] = ("block",)

    def __init__(self, config: PruneConfig, in_features: int, key: str = "") -> None:
        super().__init__(config, in_features, key)
        self.hessian: torch.Tensor | None = None
        self._factor: tuple[torch.Tensor, torch.Tensor] | None = None
        self.dampening_used: float | None = None

    def add_batch(self, inputs: torch.Tensor) -> None:
        rows = flat_inputs(inputs)
        if self.hessian is None:
            self.hessian = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float32, device=rows.device)
        self.hessian.addmm_(rows.t(), rows)
        self.n_tokens += rows.shape[0]
        self._factor = None

    def inverse_factor(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(upper Cholesky factor of the dampened H⁻¹ in float32, bool mask of dead inputs); cached."""
        if self._factor is not None:
            return self._factor
        if self.hessian is None or self.n_tokens == 0:
            raise RuntimeError("sparsegpt: the layer received no calibration inputs")
        with single_thread(self.hessian.device):
            return self._factorise()

    def _factorise(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.hessian is not None
        hessian = self.hessian.double() * (2.0 / self.n_tokens)
        diag = torch.diagonal(hessian)
        dead = diag == 0
        diag[dead] = 1.0
        mean_diag = float(diag.mean())
        damp = float(self.config.dampening)
        for _ in range(MAX_DAMPENING_TRIES):
            damped = hessian + torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device) * (
                damp * mean_diag)
            lower, info = torch.linalg.cholesky_ex(damped)
            if int(info) == 0:
                inverse = torch.cholesky_inverse(lower)
                upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
                if int(info) == 0:
                    self.dampening_used = damp
                    self._factor = (upper.float(), dead)
                    self.hessian = None  # the factor is all prune() needs; free the memory
                    return self._factor
            damp *= 10.0
        raise PrunekitError(f"sparsegpt: the Hessian of {self.key or 'a layer'} is not positive definite even with "
                            f"dampening {damp / 10:g}: use more calibration samples or raise --dampening")

    def prune(self, layer: nn.Module, sparsity: float, structure: Structure) -> torch.Tensor:
        factor, dead = self.inverse_factor()
        weight = weight_view(layer)
        # work on the transpose (in, out): a column of W is then a contiguous row
        work = weight.t().float().clone().to(factor.device)
        work[dead] = 0.0
        n_in, n_out = work.shape
        keep = torch.ones(n_in, n_out, dtype=torch.bool, device=work.device)
        block = int(self.config.block_size)
        if structure.is_nm:
            block = max(structure.m, block // structure.m * structure.m)
        total = count_to_prune(n_in * n_out, sparsity) if not structure.is_nm else 0
        with single_thread(work.device):
            for start in range(0, n_in, block):
                end = min(start + block, n_in)
                keep[start:end] = self._sweep_block(work, factor, start, end, total, structure)
        work.mul_(keep)
        weight.copy_(work.t().to(dtype=weight.dtype, device=weight.device))
        return keep.t().to(weight.device)

    def _sweep_block(self, work: torch.Tensor, factor: torch.Tensor, start: int, end: int, total: int,
                     structure: Structure) -> torch.Tensor:
        """Prune and update columns start:end of W (rows of ``work``); returns their keep-mask (cols, out)."""
        n_in, n_out = work.shape
        count = end - start
        block_w = work[start:end]  # view: updates write through
        block_h = factor[start:end, start:end]
        diag = torch.diagonal(block_h)
        errors = torch.empty_like(block_w)
        if structure.is_nm:
            keep = torch.ones_like(block_w, dtype=torch.bool)
        else:  # exact total count: the block prunes its share of the running target
            quota = _share(total, end, n_in) - _share(total, start, n_in)
            saliency = block_w.square() / diag.square().unsqueeze(1)
            keep = prune_lowest(saliency.reshape(1, -1), quota).reshape(count, n_out)
        scale = (~keep).float() / diag.unsqueeze(1)
        for i in range(count):
            if structure.is_nm and i % structure.m == 0:
                group = slice(i, i + structure.m)
                saliency = (block_w[group].square() / diag[group].square().unsqueeze(1)).t()
                keep[group] = nm_mask(saliency, structure).t()
                scale[group] = (~keep[group]).float() / diag[group].unsqueeze(1)
            torch.mul(block_w[i], scale[i], out=errors[i])
            if i + 1 < count:
                block_w[i + 1:].addr_(block_h[i, i + 1:], errors[i], alpha=-1.0)
        if end < n_in:
            work[end:].addmm_(factor[start:end, end:].t(), errors, alpha=-1.0)
        return keep

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "dampening": self.dampening_used}


def _share(total: int, column: int, columns: int) -> int:
    """round(total · column / columns) in integers (halves up): the pruned count of the first ``column`` columns."""
    return (2 * total * column + columns) // (2 * columns)
