"""FLOP (Wang, Wohlwend & Lei 2020): structured pruning by factorised L0 gates, as a TrainingMethod.

Every block linear W (d_out × d_in) becomes P·diag(z)·Q, initialised from its SVD (P = U√S, Q = √S·Vᵀ,
rank d_in·d_out/(d_in + d_out) by default or ``rank="full"``), with one hard-concrete gate z_k per
rank-1 component (learnable log α_k; l = −0.1, r = 1.1, β = 2/3). Training minimises the task loss
plus λ1(ŝ − t) + λ2(ŝ − t)², where ŝ = 1 − Σ (d_in + d_out)·Σ_k P(z_k ≠ 0) / Σ d_in·d_out is the
expected sparsity and t ramps linearly over the warm-up to the target; λ1, λ2 are raised by gradient
ascent (Adam, ``maximize=True``), and the gates get their own optimiser group (:meth:`FlopMethod.param_groups`).

Where prunekit departs from the paper's code, and why (all measured on minilm-l6 / reviews, one
epoch of 265 steps, see the README):

- Gates start nearly open: ``drop_init=0.01`` (log α = 4.6, P(z = 1) = 0.95). With the code's 0.5
  (log α = 0) every forward multiplies each rank-1 component by a broad random gate and the
  deterministic eval gates are ≈ 0.5: the training loss stayed at chance level (0.69) for the first
  100 steps, and earlier such runs ended at 61-68 % accuracy.
- Gates move fast: ``gate_lr=0.2``. Adam moves log α by at most about its rate per step and a gate
  must travel ~9 units from open to closed; the code's 3× model rate (``gate_lr_scale=3``) or CoFi's
  0.01 reach the target only in runs of thousands of steps; slower gates (0.02 to 0.1) lagged the
  ramp while λ1 wound up, then overshot the target (or never caught up in the run).
- The ramp starts at the expected sparsity of the initial gates (``ramp_from="initial"``), not at 0:
  with a start below ŝ the first steps push λ1 the wrong way.
- λ1 is reset to 0 when ŝ crosses the target (``anti_windup=True``, :meth:`FlopMethod._reset_lambda1`).
- The Lagrangian's gradient is added to the gates after the trainer clipped the task gradients
  (:meth:`FlopMethod.after_backward`). As part of the loss, its gradient (which grows with λ) would
  enter the global norm, and clipping would shrink every weight's update while the constraint pushes.

At the end each layer keeps n = round(Σ_k P(z_k ≠ 0)) components, those with the largest
deterministic gates sigmoid(0.8·log α/β), with z folded into P, and becomes two dense products
(:class:`LowRankLinear`), or one dense layer again where n·(d_in + d_out) ≥ d_in·d_out. Such a model
reloads with ``prunekit.load`` (loader ``flop``); ``fold=True`` multiplies P·Q back into plain dense
layers, which plain ``from_pretrained`` reloads (same outputs, no speed-up).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.adapters import get_adapter, make_linear_like, weight_view
from prunekit.errors import PrunekitError
from prunekit.methods.base import TrainingMethod
from prunekit.methods.registry import MethodConfig, register, setting
from prunekit.methods.schedule import steps_setting
from prunekit.record import FACTORISED_ATTR
from prunekit.surgery import LowRankLinear

LEFT, RIGHT, BETA = -0.1, 1.1, 2.0 / 3.0


@dataclass(frozen=True)
class FlopConfig(MethodConfig):
    """Settings of FLOP (see the module docstring for why the defaults depart from the paper's code)."""

    sparsity: float = setting(0.9, "target fraction of the block linears' parameters to remove, in [0, 1)")
    warmup_steps: int | float | None = setting(None, "steps over which the target ramps up, or a fraction of the "
                                                     "run if < 1 (default half the run)")
    gate_lr: float | None = setting(None, "learning rate of the gates (default 0.2)", cli=False)
    gate_lr_scale: float | None = setting(None, "gate learning rate as a multiple of --lr, instead of gate_lr",
                                          cli=False)
    lambda_lr: float = setting(0.05, "learning rate of the Lagrange multipliers", cli=False)
    rank: int | str = setting("param", "rank of the factorisation: param (keeps the parameter count), full, or N",
                              cli=False)
    beta: float = setting(BETA, "hard-concrete temperature", cli=False)
    left: float = setting(LEFT, "hard-concrete stretch, left end (< 0)", cli=False)
    right: float = setting(RIGHT, "hard-concrete stretch, right end (> 1)", cli=False)
    drop_init: float = setting(0.01, "initial drop probability of each gate", cli=False)
    fold: bool = setting(False, "multiply the factors back into dense layers (plain from_pretrained reloads them; "
                                "no speed-up)", cli=False)
    ramp_from: str = setting("initial", "start of the target ramp: initial (the gates' expected sparsity) or zero",
                             choices=("initial", "zero"), cli=False)
    lambda_optimizer: str = setting("adam", "optimiser of the multipliers", choices=("adam", "sgd"), cli=False)
    anti_windup: bool = setting(True, "reset λ1 when the expected sparsity crosses the target", cli=False)

    def check(self) -> None:
        super().check()
        if not 0.0 <= self.sparsity < 1.0:
            raise PrunekitError(f"--sparsity {self.sparsity} is outside [0, 1): give a fraction such as 0.7")
        if not (self.left < 0.0 and self.right > 1.0 and self.beta > 0.0 and 0.0 < self.drop_init < 1.0):
            raise PrunekitError("hard-concrete settings need left < 0, right > 1, beta > 0 and 0 < drop_init < 1 "
                                "(defaults -0.1, 1.1, 2/3 and 0.01)")
        if not (self.rank in ("param", "full") or (isinstance(self.rank, int) and self.rank >= 1)):
            raise PrunekitError(f"FLOP rank '{self.rank}' is not valid: use param, full or a positive integer")
        object.__setattr__(self, "warmup_steps", steps_setting(self.warmup_steps, "--warmup-steps"))


# ---- hard-concrete gates ---------------------------------------------------------------------------
def keep_probability(log_alpha: torch.Tensor, beta: float = BETA, left: float = LEFT,
                     right: float = RIGHT) -> torch.Tensor:
    """P(z ≠ 0) = sigmoid(log α − β·log(−l/r)) for each gate."""
    return torch.sigmoid(log_alpha - beta * math.log(-left / right))


def sample_gates(log_alpha: torch.Tensor, beta: float = BETA, left: float = LEFT, right: float = RIGHT,
                 eps: float = 1e-6) -> torch.Tensor:
    """A hard-concrete sample: s = sigmoid((log u − log(1 − u) + log α)/β), z = clamp(s·(r − l) + l, 0, 1)."""
    u = torch.rand_like(log_alpha).clamp(eps, 1 - eps)
    s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + log_alpha) / beta)
    return (s * (right - left) + left).clamp(0.0, 1.0)


def kept_count(log_alpha: torch.Tensor, beta: float = BETA, left: float = LEFT, right: float = RIGHT) -> int:
    """n = round(Σ P(z ≠ 0)), at least 1: how many components a layer keeps in the end."""
    return max(1, int(round(float(keep_probability(log_alpha.detach(), beta, left, right).sum()))))


def deterministic_gates(log_alpha: torch.Tensor, beta: float = BETA, left: float = LEFT,
                        right: float = RIGHT) -> torch.Tensor:
    """Test-time gates: sigmoid(0.8·log α/β) for the n largest, zero for the rest (FLOP's code)."""
    soft = torch.sigmoid(log_alpha / beta * 0.8)
    keep = torch.topk(soft, kept_count(log_alpha, beta, left, right)).indices
    gates = torch.zeros_like(soft)
    gates[keep] = soft[keep]
    return gates


# ---- layers ---------------------------------------------------------------------------------------------
class FactorizedLinear(nn.Module):
    """W = P·diag(z)·Q with hard-concrete gates z: sampled in training, deterministic in eval mode."""

    def __init__(self, layer: nn.Module, rank: int | str = "param", beta: float = BETA, left: float = LEFT,
                 right: float = RIGHT, drop_init: float = 0.01, generator: torch.Generator | None = None) -> None:
        super().__init__()
        weight = weight_view(layer).detach()
        self.out_features, self.in_features = weight.shape
        self.layer_kind: type[nn.Module] = type(layer)  # what compiled(fold=True) builds again
        self.beta, self.left, self.right = beta, left, right
        full = min(self.in_features, self.out_features)
        if rank == "full":
            r = full
        elif rank == "param":
            r = self.in_features * self.out_features // (self.in_features + self.out_features)
        else:
            r = int(rank)
        r = max(1, min(r, full))
        u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
        root = s[:r].sqrt()
        self.p = nn.Parameter((u[:, :r] * root).to(weight.dtype))
        self.q = nn.Parameter((root[:, None] * vh[:r]).to(weight.dtype))
        bias = getattr(layer, "bias", None)
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        mean = math.log(1 - drop_init) - math.log(drop_init)
        init = torch.randn(r, generator=generator) * 0.01 + mean
        self.log_alpha = nn.Parameter(init.to(weight.device))

    @property
    def rank(self) -> int:
        return self.p.shape[1]

    def gates(self) -> torch.Tensor:
        args = (self.beta, self.left, self.right)
        return sample_gates(self.log_alpha, *args) if self.training else deterministic_gates(self.log_alpha, *args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.linear(x, self.q) * self.gates().to(x.dtype)
        return F.linear(hidden, self.p, self.bias)

    def expected_rank(self) -> torch.Tensor:
        """Σ_k P(z_k ≠ 0), differentiable in log α."""
        return keep_probability(self.log_alpha, self.beta, self.left, self.right).sum()

    def compiled(self, fold: bool = False) -> nn.Module:
        """The smallest plain form with the deterministic gates folded into P (see the module docstring)."""
        with torch.no_grad():
            gates = deterministic_gates(self.log_alpha, self.beta, self.left, self.right)
            keep = torch.nonzero(gates).reshape(-1)
            p = self.p[:, keep] * gates[keep].to(self.p.dtype)
            q = self.q[keep]
            n = len(keep)
            bias = self.bias.detach() if self.bias is not None else None
            if fold or n * (self.in_features + self.out_features) >= self.in_features * self.out_features:
                return make_linear_like(p @ q, bias, like=self.layer_kind)
            layer = LowRankLinear(self.in_features, self.out_features, n, bias=bias is not None)
            layer.q.weight = nn.Parameter(q.clone().contiguous())
            layer.p.weight = nn.Parameter(p.clone().contiguous())
            if bias is not None:
                layer.p.bias = nn.Parameter(bias.clone())
            return layer


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


# ---- the training method ---------------------------------------------------------------------------------
@register("flop", kind="training", config=FlopConfig,
          description="FLOP: factorise every block linear, learn L0 gates on its rank-1 parts toward a target "
                      "sparsity, keep small dense factors")
class FlopMethod(TrainingMethod):
    """Factorise, learn gates toward a target sparsity, then make each layer small (see the module docstring).

    ``warmup_steps``: steps over which the target ramps from its start (see :meth:`target_at`) to
    ``sparsity`` (int), or a fraction of the run (float in (0, 1)); None = half the run.
    """

    name = "flop"

    def __init__(self, sparsity: float = 0.9, *, lr: float = 5e-5, seed: int = 0, **settings: Any) -> None:
        """``sparsity`` and the other fields of :class:`FlopConfig`; ``lr`` (the trainer's, for
        ``gate_lr_scale``) and ``seed`` come from the run."""
        config = FlopConfig(sparsity=sparsity, **settings)
        self.config = config
        warmup_steps, gate_lr, gate_lr_scale = config.warmup_steps, config.gate_lr, config.gate_lr_scale
        lambda_lr, rank, beta, left, right = config.lambda_lr, config.rank, config.beta, config.left, config.right
        drop_init, fold, ramp_from = config.drop_init, config.fold, config.ramp_from
        lambda_optimizer, anti_windup = config.lambda_optimizer, config.anti_windup
        self.target = float(sparsity)
        self.ramp_from, self.lambda_optimizer_name = ramp_from, lambda_optimizer
        self.anti_windup = bool(anti_windup)
        self.start = 0.0
        self.warmup_setting = warmup_steps
        self.gate_lr = float(gate_lr) if gate_lr is not None else (
            float(gate_lr_scale) * float(lr) if gate_lr_scale is not None else 0.2)
        self.lambda_lr, self.rank = float(lambda_lr), rank
        self.beta, self.left, self.right, self.drop_init = float(beta), float(left), float(right), float(drop_init)
        self.fold, self.seed = bool(fold), int(seed)
        self.layers: dict[str, FactorizedLinear] = {}
        self.dense_params = 0
        self.warmup = 1
        self.lambdas = torch.zeros(2, requires_grad=True)
        self.lambda_optimizer: torch.optim.Optimizer = (
            torch.optim.Adam([self.lambdas], lr=self.lambda_lr, maximize=True) if lambda_optimizer == "adam"
            else torch.optim.SGD([self.lambdas], lr=self.lambda_lr, maximize=True))
        self.last: dict[str, float] = {}

    def setup(self, model: nn.Module, *, total_steps: int, n_train: int) -> nn.Module:
        try:
            found = get_adapter(model).prunable_layers()
        except PrunekitError:
            found = {}
        if not found:
            raise PrunekitError("flop found no prunable linear layer in the model's blocks: use a transformer with an "
                                "adapter (llama, qwen2, gpt2, opt, bert families)")
        generator = torch.Generator().manual_seed(self.seed)
        for name, layer in found.items():
            factorised = FactorizedLinear(layer, self.rank, self.beta, self.left, self.right, self.drop_init, generator)
            _replace(model, name, factorised)
            self.layers[name] = factorised
        self.dense_params = sum(f.in_features * f.out_features for f in self.layers.values())
        self.warmup = max(1, self._resolve_warmup(total_steps))
        if self.ramp_from == "initial":
            with torch.no_grad():
                self.start = float(self.expected_sparsity())
        return model

    def _resolve_warmup(self, total_steps: int) -> int:
        value = self.warmup_setting
        if value is None:
            return int(round(0.5 * total_steps))
        if isinstance(value, float) and 0.0 < value < 1.0:
            return int(round(value * total_steps))
        return int(value)

    def settings(self) -> dict[str, Any]:
        return {"sparsity": self.target, "warmup_steps": self.warmup, "gate_lr": self.gate_lr,
                "lambda_lr": self.lambda_lr, "rank": self.rank, "beta": self.beta, "left": self.left,
                "right": self.right, "drop_init": self.drop_init, "fold": self.fold, "ramp_from": self.ramp_from,
                "ramp_start": self.start, "lambda_optimizer": self.lambda_optimizer_name,
                "anti_windup": self.anti_windup}

    def target_at(self, step: int) -> float:
        """Target sparsity at ``step``: linear over the warm-up from the start value to the final target.

        The start is the expected sparsity of the freshly initialised gates (``ramp_from="initial"``,
        0.0025 for the default drop_init 0.01 and the parameter-keeping rank, 0.17 for drop_init 0.5), or 0
        (``"zero"``, the paper's ramp).
        """
        if step >= self.warmup:
            return self.target
        return self.start + (self.target - self.start) * step / self.warmup

    def expected_sparsity(self) -> torch.Tensor:
        """ŝ = 1 − Σ (d_in + d_out)·Σ_k P(z_k ≠ 0) / Σ d_in·d_out over the factorised layers."""
        kept = sum((f.in_features + f.out_features) * f.expected_rank() for f in self.layers.values())
        return 1.0 - kept / self.dense_params  # type: ignore[return-value]

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        return [{"params": [f.log_alpha for f in self.layers.values()], "lr": self.gate_lr, "weight_decay": 0.0}]

    def lagrangian(self, step: int) -> torch.Tensor:
        """λ1·(ŝ − t) + λ2·(ŝ − t)², differentiable in every log α and in λ1, λ2."""
        expected = self.expected_sparsity()
        target = self.target_at(step)
        gap = expected - target
        lambdas = self.lambdas.to(expected.device)
        lambda1, lambda2 = self.lambdas.detach().tolist()
        self.last = {"expected_sparsity": float(expected.detach()), "target_sparsity": target,
                     "lambda1": lambda1, "lambda2": lambda2}
        return lambdas[0] * gap + lambdas[1] * gap * gap

    def after_backward(self, model: nn.Module, step: int) -> None:
        """Add the Lagrangian's gradient to the gates, then one ascent step on λ1, λ2.

        This runs after the trainer clipped the task gradients: were the Lagrangian part of the loss,
        its gradient (which grows with λ) would enter the global norm and clipping would shrink the
        weights' updates whenever the constraint pushes hard.
        """
        if not self.layers:
            return
        alphas = [f.log_alpha for f in self.layers.values()]
        grads = torch.autograd.grad(self.lagrangian(step), [*alphas, self.lambdas])
        with torch.no_grad():
            for alpha, grad in zip(alphas, grads[:-1], strict=True):
                alpha.grad = grad.to(alpha.dtype) if alpha.grad is None else alpha.grad + grad.to(alpha.dtype)
        self.lambdas.grad = grads[-1]
        self.lambda_optimizer.step()  # gradient ascent on λ1, λ2
        self.lambda_optimizer.zero_grad(set_to_none=True)
        gap = self.last["expected_sparsity"] - self.last["target_sparsity"]
        if self.anti_windup and float(self.lambdas.detach()[0]) * gap < 0:  # λ1 pushes past the target
            self._reset_lambda1()

    def _reset_lambda1(self) -> None:
        """Anti-windup: λ1 (and its optimiser momentum) back to 0 once ŝ crosses the target.

        λ1 integrates the gap; after a lag it has grown large and would keep pushing past the target
        for as many steps as the lag lasted (with Adam, |λ1| ≈ λ2, so only a gap of ~0.5 would balance
        it). Resetting on crossing leaves the quadratic term, 2λ2·(ŝ − t), to pull back at once.
        """
        with torch.no_grad():
            self.lambdas[0] = 0.0
        state = self.lambda_optimizer.state.get(self.lambdas, {})
        for key in ("exp_avg", "momentum_buffer"):
            if isinstance(state.get(key), torch.Tensor):
                state[key][0] = 0.0

    def finalize(self, model: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
        expected = float(self.expected_sparsity().detach()) if self.layers else 0.0
        layers: dict[str, dict[str, Any]] = {}
        factorised: dict[str, dict[str, Any]] = {}
        kept_params = 0
        for name, layer in self.layers.items():
            compact = layer.compiled(self.fold)
            _replace(model, name, compact)
            n = kept_count(layer.log_alpha, self.beta, self.left, self.right)
            params = sum(p.numel() for n_, p in compact.named_parameters() if not n_.endswith("bias"))
            kept_params += params
            form = "factorised" if isinstance(compact, LowRankLinear) else "dense"
            layers[name] = {"in": layer.in_features, "out": layer.out_features, "rank": layer.rank, "kept": n,
                            "form": form, "params": params}
            if isinstance(compact, LowRankLinear):
                factorised[name] = {"in": layer.in_features, "out": layer.out_features, "rank": compact.rank,
                                    "bias": compact.p.bias is not None}
        config = getattr(model, "config", None)
        if config is not None:
            if factorised:
                setattr(config, FACTORISED_ATTR, factorised)
            elif hasattr(config, FACTORISED_ATTR):
                delattr(config, FACTORISED_ATTR)
        facts = {"method": self.name, "method_settings": self.settings(), "target_sparsity": self.target,
                 "expected_sparsity": expected, "sparsity": 1.0 - kept_params / max(1, self.dense_params),
                 "lambdas": self.lambdas.detach().tolist(), "layers": layers, "factorised": factorised,
                 "loader": "flop" if factorised else None, "plain_reload": not factorised,
                 "parameters": sum(p.numel() for p in model.parameters())}
        self.layers = {}
        return model, facts

    def state_dict(self) -> dict[str, Any]:
        return {"lambdas": self.lambdas.detach().clone(), "lambda_optimizer": self.lambda_optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.lambdas.copy_(state["lambdas"])
        self.lambda_optimizer.load_state_dict(state["lambda_optimizer"])
