"""compare_latency: several models timed interleaved, on the same ids. Behaviour only, no timing thresholds."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import pytest
import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.evaluate.speed import ComparedLatency, LatencyResult, compare_latency, rotated


def log_calls(model: nn.Module, name: str, calls: list[tuple[str, int]]) -> None:
    """Note (name, number of input positions) at every forward of ``model``."""
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        calls.append((name, int(ids.shape[-1]) if ids is not None else -1))
    model.register_forward_pre_hook(hook, with_kwargs=True)


def test_rotated_gives_every_model_every_place() -> None:
    assert [rotated(["a", "b"], r) for r in range(4)] == [["a", "b"], ["b", "a"], ["a", "b"], ["b", "a"]]
    assert [rotated(["a", "b", "c"], r) for r in range(3)] == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    assert rotated(["a"], 5) == ["a"]


def test_models_run_interleaved_in_rotating_order_on_the_same_ids(make_tiny_model: Callable[..., nn.Module]) -> None:
    models = {name: make_tiny_model("llama", seed=seed) for seed, name in enumerate(("dense", "pruned", "other"))}
    calls: list[tuple[str, int]] = []
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in models}
    for name, model in models.items():
        log_calls(model, name, calls)
        model.register_forward_pre_hook(
            lambda module, args, kwargs, name=name: seen[name].append(kwargs["input_ids"].clone()), with_kwargs=True)
    results = compare_latency(models, seq_len=8, repeats=3, warmup=1, gen_tokens=0)

    assert list(results) == ["dense", "pruned", "other"]
    order = [name for name, _ in calls]
    assert order == [*rotated(list(models), 0), *rotated(list(models), 1), *rotated(list(models), 2),
                     *rotated(list(models), 3)]  # 1 warm-up + 3 timed rounds, one forward per model each
    first = seen["dense"][0]
    assert all(torch.equal(ids, first) for ids_list in seen.values() for ids in ids_list)
    for result in results.values():
        assert isinstance(result, ComparedLatency) and isinstance(result, LatencyResult)
        assert result.rounds == 3 and len(result.forward_ms_rounds) == 3
        assert all(t > 0 for t in result.forward_ms_rounds) and result.forward_ms_median > 0
        assert result.forward_ms_iqr[0] <= result.forward_ms_median <= result.forward_ms_iqr[1]
        assert result.tokens_per_second > 0 and result.baseline == "dense"
        assert result.decode_ms_per_token is None and result.decode_ratio is None and result.gen_tokens == 0
        assert result.last_logits_only  # Llama takes logits_to_keep: the forward is a prefill
    assert results["dense"].forward_ratio == pytest.approx(1.0)
    json.dumps(asdict(results["pruned"]))


def test_decode_is_interleaved_too(make_tiny_model: Callable[..., nn.Module]) -> None:
    models = {"a": make_tiny_model("llama"), "b": make_tiny_model("llama", seed=1)}
    calls: list[tuple[str, int]] = []
    for name, model in models.items():
        log_calls(model, name, calls)
    results = compare_latency(models, seq_len=6, repeats=2, warmup=0, gen_tokens=3)
    prompts = [name for name, positions in calls if positions == 6]  # prefill forwards and generate's first step
    assert prompts == ["a", "b", "a", "b", "b", "a", "b", "a"]  # round 0: forward a b, generate a b; round 1 reversed
    for result in results.values():
        assert result.decode_ms_per_token is not None and result.decode_ms_per_token > 0
        assert len(result.decode_ms_rounds) == len(result.forward_ms_rounds) == 2 and result.gen_tokens == 3
    assert results["a"].decode_ratio == pytest.approx(1.0)


def test_a_slower_model_is_reported_slower(make_tiny_model: Callable[..., nn.Module]) -> None:
    fast, slow = make_tiny_model("llama"), make_tiny_model("llama")
    slow.register_forward_pre_hook(lambda module, args: time.sleep(0.5))  # far above any load noise here
    results = compare_latency({"fast": fast, "slow": slow}, seq_len=8, repeats=3, warmup=1, gen_tokens=3)
    assert results["slow"].forward_ms_median > results["fast"].forward_ms_median
    assert results["slow"].forward_ratio > 1.0 and results["fast"].forward_ratio == pytest.approx(1.0)
    assert results["slow"].decode_ratio is not None and results["slow"].decode_ratio > 1.0
    baseline_slow = compare_latency({"fast": fast, "slow": slow}, seq_len=8, repeats=2, warmup=0, gen_tokens=0,
                                    baseline="slow")
    assert baseline_slow["fast"].forward_ratio < 1.0 and baseline_slow["slow"].baseline == "slow"


def test_encoders_have_no_decode_and_full_logits(make_tiny_model: Callable[..., nn.Module]) -> None:
    bert = make_tiny_model("bert")
    llama = make_tiny_model("llama")
    results = compare_latency({"llama": llama, "bert": bert}, seq_len=8, repeats=2, warmup=0, gen_tokens=3)
    assert results["bert"].decode_ms_per_token is None and results["bert"].decode_ratio is None
    assert not results["bert"].last_logits_only and results["llama"].decode_ms_per_token is not None
    full = compare_latency({"llama": llama}, seq_len=8, repeats=1, warmup=0, gen_tokens=0, last_logits_only=False)
    assert not full["llama"].last_logits_only


def test_training_mode_is_restored_and_errors_are_one_line(make_tiny_model: Callable[..., nn.Module]) -> None:
    model = make_tiny_model("llama").train()
    compare_latency({"m": model}, seq_len=4, repeats=1, warmup=0, gen_tokens=0)
    assert model.training
    with pytest.raises(PrunekitError, match="at least one model"):
        compare_latency({})
    with pytest.raises(PrunekitError, match="baseline 'x'"):
        compare_latency({"m": model}, baseline="x")
    with pytest.raises(PrunekitError, match="positive"):
        compare_latency({"m": model}, repeats=0)
    with pytest.raises(PrunekitError, match="above the model's limit"):
        compare_latency({"m": model}, seq_len=129)
    with pytest.raises(PrunekitError, match="generated tokens is above"):
        compare_latency({"m": model}, seq_len=120, gen_tokens=20)
