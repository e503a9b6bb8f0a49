"""FLOP: hard-concrete gate expectations, expected sparsity, the Lagrangian, compiling and reloading."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification
from transformers.pytorch_utils import Conv1D

from prunekit.errors import PrunekitError
from prunekit.export import load, save_model
from prunekit.methods import get_method
from prunekit.methods.flop import (
    FactorizedLinear,
    FlopMethod,
    LowRankLinear,
    deterministic_gates,
    keep_probability,
    kept_count,
    sample_gates,
)
from prunekit.methods.gradual import build_training_method


def test_keep_probability_by_hand_and_by_monte_carlo() -> None:
    # log alpha = 0, beta = 2/3, l = -0.1, r = 1.1: sigmoid(-(2/3)·ln(0.1/1.1)) = sigmoid(1.598597) = 0.8318222
    assert keep_probability(torch.tensor([0.0])).item() == pytest.approx(0.8318222, abs=1e-6)
    assert keep_probability(torch.tensor([0.0]), beta=1.0).item() == pytest.approx(1 / (1 + 1 / 11), abs=1e-6)
    torch.manual_seed(0)
    log_alpha = torch.tensor([-3.0, -1.0, 0.0, 2.0])
    samples = sample_gates(log_alpha.expand(200_000, 4).contiguous())
    assert ((samples >= 0) & (samples <= 1)).all()
    empirical = (samples > 0).float().mean(0)
    assert torch.allclose(empirical, keep_probability(log_alpha), atol=4e-3)
    exactly_one = (samples == 1).float().mean(0)  # P(z = 1) = 1 - sigmoid(β·log((1 - l)/(r - 1)) - log α)
    assert torch.allclose(exactly_one, torch.sigmoid(log_alpha - (2 / 3) * math.log(1.1 / 0.1)), atol=4e-3)


def test_deterministic_gates_keep_the_expected_number() -> None:
    log_alpha = torch.tensor([3.0, -4.0, 2.0, -5.0, 0.5])
    n = kept_count(log_alpha)  # round(sum of keep probabilities)
    assert n == round(float(keep_probability(log_alpha).sum())) == 3
    gates = deterministic_gates(log_alpha)
    assert torch.equal(gates != 0, torch.tensor([True, False, True, False, True]))
    assert torch.allclose(gates[0], torch.sigmoid(torch.tensor(3.0) / (2 / 3) * 0.8))


def _method_on(layers: dict[str, FactorizedLinear], sparsity: float = 0.5) -> FlopMethod:
    method = FlopMethod(sparsity=sparsity)
    method.layers = layers
    method.dense_params = sum(f.in_features * f.out_features for f in layers.values())
    method.warmup = 10
    return method


def test_expected_sparsity_by_hand() -> None:
    torch.manual_seed(0)
    a = FactorizedLinear(nn.Linear(12, 4), rank="full")  # 4 components of 16 params, dense 48
    b = FactorizedLinear(nn.Linear(6, 6), rank="param")  # rank 36/12 = 3 components of 12 params, dense 36
    assert (a.rank, b.rank) == (4, 3)
    with torch.no_grad():
        a.log_alpha.fill_(0.0)
        b.log_alpha.copy_(torch.tensor([10.0, -10.0, 0.0]))
    p0 = 0.8318222
    p_b = keep_probability(torch.tensor([10.0, -10.0, 0.0])).sum().item()
    method = _method_on({"a": a, "b": b})
    expected = 1 - (16 * 4 * p0 + 12 * p_b) / (48 + 36)
    assert method.expected_sparsity().item() == pytest.approx(expected, abs=1e-5)
    assert method.target_at(0) == 0.0 and method.target_at(5) == 0.25 and method.target_at(50) == 0.5


def test_lagrangian_ascent_on_lambdas() -> None:
    torch.manual_seed(0)
    layer = FactorizedLinear(nn.Linear(8, 8), rank="full")
    method = _method_on({"l": layer}, sparsity=0.9)
    assert method.extra_loss(nn.Module(), step=10) is None  # the Lagrangian stays out of the clipped loss
    method.after_backward(nn.Module(), 10)  # target 0.9, expected sparsity about 1 - 2·0.83 < 0.9
    assert layer.log_alpha.grad is not None and (layer.log_alpha.grad == 0).all()  # λ = 0: no push yet
    lambda1, lambda2 = method.lambdas.tolist()
    assert lambda1 < 0 < lambda2  # ascent: d/dλ1 = ŝ - t < 0, d/dλ2 = (ŝ - t)² > 0
    task = torch.full_like(layer.log_alpha, 0.125)
    layer.log_alpha.grad = task.clone()  # as left by backward and clipping
    method.after_backward(nn.Module(), 10)
    # d/dlog α_k of λ1·gap + λ2·gap² = (λ1 + 2λ2·gap)·dŝ/dlog α_k, dŝ/dlog α_k = -(16/64)·p_k(1 - p_k)
    p = keep_probability(layer.log_alpha.detach())
    gap = 1 - 16 * p.sum() / 64 - 0.9
    by_hand = task + (lambda1 + 2 * lambda2 * gap) * -(16 / 64) * p * (1 - p)
    assert torch.allclose(layer.log_alpha.grad, by_hand, atol=1e-7)
    assert (layer.log_alpha.grad > task).all()  # the push is towards smaller log α, i.e. more sparsity


def test_lambda1_resets_when_the_target_is_crossed() -> None:
    torch.manual_seed(0)
    layer = FactorizedLinear(nn.Linear(8, 8), rank="param")  # 4 components of 16 params, dense 64
    method = _method_on({"l": layer}, sparsity=0.3)
    with torch.no_grad():
        layer.log_alpha.fill_(-3.0)  # ŝ = 1 - 64·p/64 with p = sigmoid(-3 + 1.6) = 0.20: far past the target
        method.lambdas.copy_(torch.tensor([-2.0, 1.0]))  # wound up while ŝ lagged below the target
    method.after_backward(nn.Module(), 10)
    lambda1, lambda2 = method.lambdas.tolist()
    assert lambda1 == 0.0 and lambda2 > 1.0  # λ1 and its momentum reset; λ2 keeps rising
    assert method.lambda_optimizer.state[method.lambdas]["exp_avg"][0] == 0.0
    # with λ1 = 0 the quadratic term alone now pulls back towards density: d/dlog α < 0 (log α rises)
    layer.log_alpha.grad = None
    method.after_backward(nn.Module(), 10)
    assert (layer.log_alpha.grad < 0).all()
    plain = _method_on({"l": layer}, sparsity=0.3)
    plain.anti_windup = False  # the paper's plain ascent: λ1 only moves by its (Adam) step
    with torch.no_grad():
        plain.lambdas.copy_(torch.tensor([-2.0, 1.0]))
    plain.after_backward(nn.Module(), 10)
    assert plain.lambdas[0].item() == pytest.approx(-2.0 + plain.lambda_lr, abs=1e-4)


def test_ramp_starts_at_the_initial_expected_sparsity(make_tiny_model: Callable[..., nn.Module]) -> None:
    method = FlopMethod(sparsity=0.6, warmup_steps=10, drop_init=0.5)
    method.setup(make_tiny_model("bert"), total_steps=40, n_train=1)
    # log α ~ N(0, 0.01²): every gate keeps with p = sigmoid(0 - (2/3)·log(0.1/1.1)) = 0.832, and the
    # parameter-keeping rank makes (d_in + d_out)·r ≈ d_in·d_out, so ŝ starts near 1 - 0.832
    assert method.start == pytest.approx(1 - 0.8318, abs=0.02)
    assert method.target_at(0) == pytest.approx(method.start)
    assert method.target_at(5) == pytest.approx((method.start + 0.6) / 2)
    assert method.target_at(10) == method.target_at(20) == 0.6
    zero = FlopMethod(sparsity=0.6, warmup_steps=10, drop_init=0.5, ramp_from="zero")
    zero.setup(make_tiny_model("bert"), total_steps=40, n_train=1)
    assert zero.target_at(0) == 0.0 and zero.target_at(5) == pytest.approx(0.3)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_compiled_layer_equals_gated_layer(kind: str) -> None:
    torch.manual_seed(0)
    dense = nn.Linear(24, 16) if kind == "linear" else Conv1D(16, 24)
    layer = FactorizedLinear(dense, rank="full")
    assert torch.allclose(layer.p @ layer.q, dense.weight if kind == "linear" else dense.weight.t(), atol=1e-5)
    with torch.no_grad():
        layer.log_alpha.copy_(torch.linspace(-8, 4, 16))
    layer.eval()
    x = torch.randn(3, 5, 24)
    gated = layer(x)
    small = layer.compiled()
    assert isinstance(small, LowRankLinear) and small.rank == kept_count(layer.log_alpha) < 16 * 24 / 40
    assert torch.allclose(small(x), gated, atol=1e-5)
    folded = layer.compiled(fold=True)
    assert isinstance(folded, type(dense)) and torch.allclose(folded(x), gated, atol=1e-5)
    with torch.no_grad():
        layer.log_alpha.fill_(5.0)  # everything kept: two factors would be bigger, so it stays dense
    assert isinstance(layer.compiled(), type(dense))


def _train(model: nn.Module, method: FlopMethod, steps: int, tokens: torch.Tensor, labels: torch.Tensor) -> None:
    model = method.setup(model, total_steps=steps, n_train=len(tokens))
    groups = method.param_groups(model)
    taken = {id(p) for g in groups for p in g["params"]}
    optimizer = torch.optim.AdamW([{"params": [p for p in model.parameters() if id(p) not in taken], "lr": 1e-3},
                                   *groups])
    model.train()
    for step in range(steps):
        loss = model(input_ids=tokens, labels=labels).loss
        loss.backward()
        method.after_backward(model, step)
        optimizer.step()
        optimizer.zero_grad()
        method.after_step(model, step)
    model.eval()


@pytest.fixture
def one_thread() -> Any:
    """Tiny models train ~50x faster on one thread than on two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_training_reaches_target_and_reloads(make_tiny_model: Callable[..., nn.Module], tmp_path: Path,
                                             one_thread: Any) -> None:
    model = make_tiny_model("bert", num_labels=3, num_hidden_layers=1)
    tokens = torch.randint(4, 100, (8, 10), generator=torch.Generator().manual_seed(0))
    labels = torch.arange(8) % 3
    settings = {"sparsity": 0.6, "warmup_steps": 0.5}  # default gate and λ rates
    method = build_training_method("flop", settings, lr=1e-3)
    assert isinstance(method, FlopMethod) and get_method("flop").implementation is FlopMethod
    _train(model, method, 100, tokens, labels)
    assert method.expected_sparsity().item() == pytest.approx(0.6, abs=0.08)
    with torch.no_grad():
        gated = model(input_ids=tokens).logits
    small, facts = method.finalize(model)
    with torch.no_grad():
        assert torch.allclose(small(input_ids=tokens).logits, gated, atol=1e-5)
    assert facts["loader"] == "flop" and facts["factorised"]
    assert facts["sparsity"] == pytest.approx(0.6, abs=0.1)
    assert any(isinstance(m, LowRankLinear) for m in small.modules())
    out = save_model(small, None, tmp_path / "flop", {"task": "classification", "loader": facts["loader"]})
    loaded, _, _ = load(out)
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=tokens).logits, gated, atol=1e-5)
    assert sum(p.numel() for p in loaded.parameters()) == facts["parameters"]


def test_fold_gives_a_plain_model(make_tiny_model: Callable[..., nn.Module], tmp_path: Path) -> None:
    model = make_tiny_model("gpt2")
    tokens = torch.randint(4, 100, (4, 10), generator=torch.Generator().manual_seed(0))
    method = FlopMethod(sparsity=0.5, fold=True)
    model = method.setup(model, total_steps=10, n_train=4)
    with torch.no_grad():
        for i, layer in enumerate(method.layers.values()):
            layer.log_alpha.copy_(torch.linspace(-4, 4, layer.rank) + i % 3)
    model.eval()
    with torch.no_grad():
        gated = model(input_ids=tokens).logits
    folded, facts = method.finalize(model)
    assert facts["loader"] is None and facts["plain_reload"]
    assert not hasattr(folded.config, "prunekit_factorised")
    out = save_model(folded, None, tmp_path / "folded", {"task": "causal-lm"})
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        assert torch.allclose(AutoModelForCausalLM.from_pretrained(out)(input_ids=tokens).logits, gated, atol=1e-4)


class _NoBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config: Any = type("Config", (), {"model_type": "toy"})()
        self.embed = nn.Embedding(10, 4)


def test_no_prunable_layer_is_a_clear_error() -> None:
    with pytest.raises(PrunekitError, match="no prunable linear layer"):
        FlopMethod(sparsity=0.5).setup(_NoBlocks(), total_steps=10, n_train=1)
    with pytest.raises(PrunekitError, match="outside"):
        FlopMethod(sparsity=1.0)
    with pytest.raises(PrunekitError, match="rank"):
        FlopMethod(sparsity=0.5, rank="tiny")


def test_state_dict_round_trip() -> None:
    method = FlopMethod(sparsity=0.5)
    with torch.no_grad():
        method.lambdas.copy_(torch.tensor([-0.5, 0.25]))
    other = FlopMethod(sparsity=0.5)
    other.load_state_dict(method.state_dict())
    assert other.lambdas.tolist() == [-0.5, 0.25]


def test_classifier_head_untouched(make_tiny_model: Callable[..., nn.Module]) -> None:
    model = make_tiny_model("bert")
    method = FlopMethod(sparsity=0.5)
    method.setup(model, total_steps=4, n_train=1)
    assert all(".encoder.layer." in name for name in method.layers)
    assert isinstance(model.classifier, nn.Linear)
    assert isinstance(AutoModelForSequenceClassification, type)


def test_cli_train_flop(make_tiny_model: Callable[..., nn.Module], tiny_tokenizer: Any, tmp_path: Path,
                        one_thread: Any) -> None:
    import csv
    import json

    from conftest import TOKENIZER_TEXT
    from prunekit.cli.main import main

    folder = tmp_path / "bert"
    make_tiny_model("bert").save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    table = tmp_path / "reviews.csv"
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for i in range(40):
            writer.writerow([TOKENIZER_TEXT[i % len(TOKENIZER_TEXT)], i % 2])
    out = tmp_path / "flop"
    assert main(["train", str(folder), "--task", f"csv:{table}", "--method", "flop", "--sparsity", "0.5",
                 "--max-steps", "6", "--batch-size", "8", "--max-length", "16", "--eval-steps", "0",
                 "--save-steps", "0", "--no-progress", "--device", "cpu", "--out", str(out)]) == 0
    record = json.loads((out / "prunekit.json").read_text())
    assert record["method"] == "flop" and record["method_settings"]["sparsity"] == 0.5
    model, _, _ = load(out)
    if record["loader"] == "flop":
        assert any(isinstance(m, LowRankLinear) for m in model.modules())
    folded = tmp_path / "folded"
    assert main(["train", str(folder), "--task", f"csv:{table}", "--method", "flop", "--sparsity", "0.5",
                 "--method-arg", "fold=true", "--max-steps", "4", "--batch-size", "8", "--max-length", "16",
                 "--eval-steps", "0", "--save-steps", "0", "--no-progress", "--device", "cpu",
                 "--out", str(folded)]) == 0
    assert json.loads((folded / "prunekit.json").read_text())["loader"] is None
    AutoModelForSequenceClassification.from_pretrained(folded)
