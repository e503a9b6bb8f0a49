"""gmp, movement and mgpp: the prior gradient (by hand and by autograd), hand-made score and mask cases,
masks enforced against AdamW, and whole training runs on tiny models."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from prunekit.adapters import get_adapter, weight_view
from prunekit.errors import PrunekitError
from prunekit.finetune import train_model
from prunekit.finetune.hooks import TrainingMethod
from prunekit.methods.gradual import (
    GMP,
    MGPP,
    Movement,
    available_methods,
    build_training_method,
    prior_gradient,
)
from test_finetune import bert_tokenizer, quick, tiny_bert, toy_classification


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2, bias=False)
        self.norm = nn.LayerNorm(2)


class Toy(nn.Module):
    """Two blocks of one 2x2 linear layer: hand-set weights, found by the generic adapter."""

    def __init__(self, first: list[list[float]], second: list[list[float]]) -> None:
        super().__init__()
        self.config = SimpleNamespace(model_type="toy")
        self.embed = nn.Embedding(3, 2)
        self.layers = nn.ModuleList([Block(), Block()])
        with torch.no_grad():
            self.layers[0].lin.weight.copy_(torch.tensor(first))
            self.layers[1].lin.weight.copy_(torch.tensor(second))


def set_grads(model: Toy, first: list[list[float]], second: list[list[float]]) -> None:
    model.layers[0].lin.weight.grad = torch.tensor(first)
    model.layers[1].lin.weight.grad = torch.tensor(second)


# ---------------------------------------------------------------------------------------------------------
# MGPP prior gradient


def hand_prior_gradient(theta: float, lam: float, s0: float, s1: float, n: int) -> float:
    """The spec's formula, written out with math (float64): (1/n)·θ·[q/σ0² + (1 − q)/σ1²]."""
    c1 = math.log(lam) - math.log(1 - lam) + 0.5 * math.log(s0) - 0.5 * math.log(s1)
    c2 = 1 / (2 * s0) - 1 / (2 * s1)
    q = 1 / (1 + math.exp(c1 + c2 * theta * theta))
    return theta * (q / s0 + (1 - q) / s1) / n


def test_prior_gradient_matches_a_hand_computation() -> None:
    lam, s0, s1, n = 0.1, 1e-4, 0.05, 10
    thetas = [0.0, 0.003, -0.01, 0.02, 0.05, -0.3]
    got = prior_gradient(torch.tensor(thetas, dtype=torch.float64), lam, s0, s1, n)
    for theta, value in zip(thetas, got.tolist(), strict=True):
        assert value == pytest.approx(hand_prior_gradient(theta, lam, s0, s1, n), rel=1e-10, abs=1e-15)
    # small weights feel the spike (≈ θ/(nσ0²)), large ones only the slab (≈ θ/(nσ1²))
    assert got[1] == pytest.approx(0.003 / (n * s0), rel=1e-2)
    assert got[5] == pytest.approx(-0.3 / (n * s1), rel=1e-6)


def test_prior_gradient_is_the_derivative_of_the_negative_log_prior() -> None:
    lam, s0, s1, n = 0.2, 1e-3, 0.1, 7
    theta = torch.linspace(-0.4, 0.4, 81, dtype=torch.float64, requires_grad=True)

    def log_normal(x: torch.Tensor, variance: float) -> torch.Tensor:
        return -0.5 * math.log(2 * math.pi * variance) - x * x / (2 * variance)

    log_prior = torch.logsumexp(torch.stack([math.log(lam) + log_normal(theta, s1),
                                             math.log(1 - lam) + log_normal(theta, s0)]), dim=0)
    (-(log_prior.sum()) / n).backward()
    assert theta.grad is not None
    expected = prior_gradient(theta.detach(), lam, s0, s1, n)
    assert torch.allclose(theta.grad, expected, rtol=1e-9, atol=1e-12)


def test_prior_gradient_is_finite_at_the_authors_settings() -> None:
    theta = torch.tensor([0.0, 1e-7, -1e-5, 1e-4, 0.01, 1.0, -3.0])
    grad = prior_gradient(theta, 0.1, 1e-10, 0.05, 8500)
    assert torch.isfinite(grad).all()
    assert torch.equal(torch.sign(grad), torch.sign(theta))
    assert grad[1] == pytest.approx(1e-7 / (8500 * 1e-10), rel=1e-4)  # deep in the spike


def test_lambda_is_annealed_over_the_pruning_phase() -> None:
    method = MGPP(0.9, warmup_steps=10, final_steps=20, prior_lambda=0.1)
    method.setup(tiny_bert(), total_steps=110, n_train=100)  # pruning phase: steps 10..90
    assert method.lambda_at(0) == pytest.approx(0.1)
    assert method.lambda_at(50) == pytest.approx(0.1 * (0.001 + 0.999 * 0.5))
    assert method.lambda_at(90) == pytest.approx(0.1 * 0.001)
    assert method.lambda_at(110) == pytest.approx(0.1 * 0.001)


def test_mgpp_adds_the_prior_only_to_prunable_weights() -> None:
    model = tiny_bert()
    method = MGPP(0.5, warmup_steps=0, final_steps=0, sigma0=1e-4, sigma1=0.05)
    method.setup(model, total_steps=10, n_train=50)
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    method.after_backward(model, 0)
    layers = get_adapter(model).prunable_layers()
    prunable = {id(layer.weight) for layer in layers.values()}
    for name, layer in layers.items():
        expected = prior_gradient(weight_view(layer), 0.1, 1e-4, 0.05, 50)
        assert torch.allclose(layer.weight.grad, expected), name
    for name, param in model.named_parameters():
        if id(param) not in prunable:
            assert not param.grad.any(), f"{name} got a prior gradient"


# ---------------------------------------------------------------------------------------------------------
# scores and masks on a hand-made model


def test_gmp_global_and_per_layer_masks() -> None:
    first, second = [[1.0, -4.0], [0.5, 2.0]], [[0.1, 3.0], [-0.2, 0.3]]
    model = Toy(first, second)
    gmp = GMP(0.5, compare="global", warmup_steps=0, final_steps=0)
    gmp.setup(model, total_steps=4, n_train=1)
    gmp.update_masks(0.5)  # the 4 smallest |w| of all 8: 0.1, 0.2, 0.3, 0.5
    assert gmp.masks["layers.0.lin"].tolist() == [[True, True], [False, True]]
    assert gmp.masks["layers.1.lin"].tolist() == [[False, True], [False, False]]
    per_layer = GMP(0.5, compare="layer", warmup_steps=0, final_steps=0)
    per_layer.setup(Toy(first, second), total_steps=4, n_train=1)
    per_layer.update_masks(0.5)  # two per layer
    assert per_layer.masks["layers.0.lin"].tolist() == [[False, True], [False, True]]
    assert per_layer.masks["layers.1.lin"].tolist() == [[False, True], [False, True]]


def test_movement_scores_accumulate_minus_theta_times_grad() -> None:
    model = Toy([[1.0, -1.0], [2.0, 0.5]], [[0.1, 3.0], [-2.0, 1.0]])
    movement = Movement(0.5, warmup_steps=0, final_steps=0)
    movement.setup(model, total_steps=4, n_train=1)
    set_grads(model, [[1.0, 1.0], [-1.0, 0.0]], [[0.0, 1.0], [1.0, -1.0]])
    movement.after_backward(model, 0)
    set_grads(model, [[0.5, -2.0], [0.0, 1.0]], [[-10.0, 0.0], [1.0, 0.0]])
    movement.after_backward(model, 1)
    # S = -(θ·g1 + θ·g2)
    assert movement.scores()["layers.0.lin"].tolist() == [[-1.5, -1.0], [2.0, -0.5]]
    assert movement.scores()["layers.1.lin"].tolist() == [[1.0, -3.0], [4.0, 1.0]]
    movement.update_masks(0.5)  # prune the 4 lowest of -1.5, -1, 2, -0.5, 1, -3, 4, 1
    assert movement.masks["layers.0.lin"].tolist() == [[False, False], [True, False]]
    assert movement.masks["layers.1.lin"].tolist() == [[True, False], [True, True]]
    movement.apply_masks()
    assert model.layers[0].lin.weight.tolist() == [[0.0, 0.0], [2.0, 0.0]]
    # a pruned weight's score keeps moving with its old value; pruned weights get no gradient
    set_grads(model, [[-4.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]])
    movement.after_backward(model, 2)
    assert movement.scores()["layers.0.lin"][0, 0] == pytest.approx(-1.5 + 4.0)
    assert model.layers[0].lin.weight.grad.tolist() == [[0.0, 0.0], [0.0, 0.0]]
    # now (0, 0) scores 2.5 and beats (1, 1) of layer 1's 1.0 (ties broken by position): it comes back with 1.0
    movement.update_masks(0.5)
    assert movement.masks["layers.0.lin"][0, 0]
    assert model.layers[0].lin.weight[0, 0].item() == 1.0


def test_mgpp_uses_one_global_threshold() -> None:
    model = tiny_bert()
    method = MGPP(0.7)
    method.setup(model, total_steps=10, n_train=10)
    layers = get_adapter(model).prunable_layers()
    before = {name: weight_view(layer).abs().clone() for name, layer in layers.items()}
    method.update_masks(0.7)
    kept = torch.cat([before[name][mask] for name, mask in method.masks.items()])
    pruned = torch.cat([before[name][~mask] for name, mask in method.masks.items()])
    assert kept.min() >= pruned.max()
    assert pruned.numel() == round(0.7 * (kept.numel() + pruned.numel()))
    with pytest.raises(PrunekitError, match="global"):
        MGPP(0.5, compare="layer")


def test_masks_stay_enforced_after_adamw_steps() -> None:
    model = tiny_bert()
    gmp = GMP(0.8, warmup_steps=2, final_steps=3, update_every=1)
    gmp.setup(model, total_steps=8, n_train=16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    batch = bert_tokenizer()(["good movie", "bad plot the"], padding=True, return_tensors="pt")
    labels = torch.tensor([1, 0])
    layers = get_adapter(model).prunable_layers()
    revived = 0
    for step in range(8):
        model(**batch, labels=labels).loss.backward()
        gmp.after_backward(model, step)
        optimizer.step()
        if step >= 3:  # Adam's momentum moves pruned weights off zero...
            revived += sum(int((weight_view(layer)[~gmp.masks[name]] != 0).sum()) for name, layer in layers.items())
        gmp.after_step(model, step)
        optimizer.zero_grad()
        for name, layer in layers.items():  # ...and after_step puts them back
            assert not weight_view(layer)[~gmp.masks[name]].any(), (step, name)
    assert revived > 0
    assert gmp.current_sparsity == 0.8 and gmp.schedule is not None and gmp.schedule.is_frozen(8)


# ---------------------------------------------------------------------------------------------------------
# whole runs


@pytest.mark.parametrize("name", ["gmp", "movement", "mgpp"])
def test_training_reaches_the_target_and_spares_embeddings_and_head(tmp_path: Path, name: str) -> None:
    model = tiny_bert()
    settings: dict[str, Any] = {"sparsity": 0.9, "update_every": 2} | ({"sigma0": 1e-6} if name == "mgpp" else {})
    method = build_training_method(name, settings)
    result = train_model(model, bert_tokenizer(), toy_classification(96), method=method,
                         config=quick(weight_decay=0.05, max_steps=12), checkpoint_dir=tmp_path / "ckpt")
    facts = result.facts
    assert facts["sparsity"] == pytest.approx(0.9, abs=1e-4) and facts["target_sparsity"] == 0.9
    schedule = facts["schedule"]
    assert (schedule["warmup_steps"], schedule["final_steps"], schedule["end_step"]) == (1, 2, 10)
    assert facts["mask_updates"] == 6  # steps 1, 3, 5, 7, 9 and t_e = 10
    assert (result.model.bert.embeddings.word_embeddings.weight[1:] != 0).all()  # row 0: padding
    assert (result.model.classifier.weight != 0).all()
    assert (result.model.bert.encoder.layer[0].attention.output.LayerNorm.weight != 0).all()


def test_method_state_round_trip() -> None:
    model = tiny_bert()
    movement = Movement(0.5, warmup_steps=0, final_steps=0)
    movement.setup(model, total_steps=4, n_train=1)
    for layer in get_adapter(model).prunable_layers().values():
        layer.weight.grad = torch.randn_like(layer.weight)
    movement.after_backward(model, 0)
    movement.update_masks(0.5)
    fresh = Movement(0.5, warmup_steps=0, final_steps=0)
    fresh.setup(tiny_bert(seed=1), total_steps=4, n_train=1)
    fresh.load_state_dict(movement.state_dict())
    for name in movement.masks:
        assert torch.equal(fresh.masks[name], movement.masks[name])
        assert torch.equal(fresh.importance[name], movement.importance[name])
    assert fresh.updates == 1 and fresh.current_sparsity == 0.5


def test_registry_and_bad_settings() -> None:
    assert {"none", "gmp", "movement", "mgpp"} <= set(available_methods())
    from prunekit.methods import available_methods as every

    assert all(issubclass(spec.implementation, TrainingMethod) for spec in every("training"))
    assert type(build_training_method("none", {})).__name__ == "DenseTraining"
    with pytest.raises(PrunekitError, match="method none does not take sparsity; it takes no settings"):
        build_training_method("none", {"sparsity": 0.9})
    with pytest.raises(PrunekitError, match="unknown method 'platon': use one of gmp, movement, mgpp, none, flop"):
        build_training_method("platon", {})
    with pytest.raises(PrunekitError, match="outside"):
        build_training_method("gmp", {"sparsity": 1.0})
    with pytest.raises(PrunekitError, match="variances"):
        build_training_method("mgpp", {"sparsity": 0.5, "sigma0": 0.1, "sigma1": 0.01})
    with pytest.raises(PrunekitError, match="do not fit"):
        GMP(0.5, warmup_steps=8, final_steps=2).setup(tiny_bert(), total_steps=10, n_train=1)
