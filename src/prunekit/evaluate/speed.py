"""Wall-clock speed of a model: one forward pass, and per generated token for causal LMs.

Protocol: random token ids (seeded) of shape (batch_size, seq_len); ``n_warmup`` untimed runs, then
``n_runs`` timed ones, each by the standard library's ``timeit.Timer`` (one call per measurement, so
every run's time is kept; the garbage collector is off while it runs; CUDA synchronised on a GPU). Not
``torch.utils.benchmark.Timer``: it runs two untimed warm-up calls before every measurement, which would
triple the cost and break the interleaving below. The median and the quartiles are reported, with the
thread count. Decoding: ``model.generate`` greedy with the KV cache, ``gen_tokens`` new tokens
after a ``seq_len`` prompt; a streamer notes when each new token comes out, so one run's time per
generated token = (time of the last token - time of the first) / (gen_tokens - 1): the prefill (which
yields the first token) is left out. The median over ``n_runs`` runs is reported.

Comparing models (:func:`compare_latency`): one model measured after another is at the mercy of
whatever else the machine did meanwhile, and a busy minute can make a model look 3x slower. So the
models are measured interleaved, on the same token ids: each round runs one forward of every model,
then (causal LMs) one greedy generation of every model, in an order rotated by one each round (with
two models: A B, B A, A B, ...); ``warmup`` untimed rounds come first. Per model the median over
rounds is reported, and its ratio to the baseline model is the median over rounds of the per-round
ratio, so a slow drift of the machine cancels out. A causal LM's forward computes the logits of the
last position only (``logits_to_keep=1``, what ``generate`` does for the prompt) when it takes that
argument and ``last_logits_only`` is on.
"""

from __future__ import annotations

import contextlib
import inspect
import time
import timeit
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.generation.streamers import BaseStreamer

from prunekit.errors import PrunekitError
from prunekit.evaluate.perplexity import (
    check_seq_len,
    eval_mode,
    forward_kwargs,
    max_positions,
    model_call_kwargs,
    place_model,
)


@dataclass
class LatencyResult:
    """Median forward time, its quartiles, throughput and per-token decode time, with the settings used."""

    batch_size: int
    seq_len: int
    forward_ms_median: float
    forward_ms_iqr: tuple[float, float]  # (25th, 75th percentile) of the forward time, ms
    tokens_per_second: float
    decode_ms_per_token: float | None  # None for models that do not generate (encoders)
    gen_tokens: int
    threads: int
    device: str
    dtype: str


def is_causal_lm(model: nn.Module) -> bool:
    """True for models that generate text: a ``generate`` method, and a decoder config or a language-model head
    by transformers' own registry (:func:`prunekit.adapters.model_head`, not the class name)."""
    if not callable(getattr(model, "generate", None)):
        return False
    if getattr(getattr(model, "config", None), "is_decoder", False):
        return True
    from prunekit.adapters.heads import model_head

    return model_head(model) == "causal-lm"


def _timed(fn: Callable[[], Any], device: torch.device, n_warmup: int, n_runs: int) -> list[float]:
    """Seconds taken by each of ``n_runs`` calls of ``fn`` after ``n_warmup`` untimed calls."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(n_warmup):
        fn()
    sync()
    return [_once(fn, device) for _ in range(n_runs)]


class _StepClock(BaseStreamer):
    """A generate() streamer that notes the time each new token comes out (the first call is the prompt)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    def decode_seconds(self) -> float:
        """Mean time per decode step: from the first new token to the last, over the tokens in between."""
        new = self.times[1:]  # times[0] is the prompt, handed over before the prefill
        if len(new) < 2:
            raise PrunekitError("generation stopped before a second token: latency needs --gen-tokens 2 or more")
        return (new[-1] - new[0]) / (len(new) - 1)


def _vocab_size(model: nn.Module, vocab_size: int | None) -> int:
    if vocab_size is not None:
        return vocab_size
    value = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(value, int) or value < 1:
        raise PrunekitError("the model's config has no vocab_size: pass vocab_size to latency()")
    return value


def _dtype(model: nn.Module) -> torch.dtype:
    for param in model.parameters():
        return param.dtype
    return torch.get_default_dtype()


def _check_decode_length(model: nn.Module, seq_len: int, gen_tokens: int) -> None:
    limit = max_positions(model)
    if limit is not None and seq_len + gen_tokens > limit:
        raise PrunekitError(f"a {seq_len}-token prompt plus {gen_tokens} generated tokens is above the model's "
                            f"limit of {limit}: lower --latency-seq-len or --gen-tokens")


def _decode_seconds(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, gen_tokens: int,
                    device: torch.device) -> float:
    """Seconds per generated token of one greedy ``generate`` (KV cache on), prefill left out."""
    pad = getattr(getattr(model, "config", None), "eos_token_id", None)
    if isinstance(pad, (list, tuple)):
        pad = pad[0] if pad else None
    clock = _StepClock(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.generate(  # type: ignore[operator]
            input_ids=ids, attention_mask=mask, max_new_tokens=gen_tokens, min_new_tokens=gen_tokens,
            do_sample=False, use_cache=True, pad_token_id=pad if pad is not None else 0, streamer=clock)
    return clock.decode_seconds()


def latency(model: nn.Module, batch_size: int = 1, seq_len: int = 128, n_warmup: int = 2, n_runs: int = 10,
            gen_tokens: int = 32, vocab_size: int | None = None, device: str | torch.device | None = None,
            seed: int = 0) -> LatencyResult:
    """Time forward passes (and greedy decoding for causal LMs) on seeded random tokens; see the module docstring.

    ``device`` None runs where the model is. Decode time needs ``gen_tokens >= 2``; with fewer it is None.
    To compare models, use :func:`compare_latency`: timings taken one model after another are not comparable.
    """
    if batch_size < 1 or seq_len < 1 or n_runs < 1 or n_warmup < 0:
        raise PrunekitError(f"latency needs positive batch size, sequence length and runs (got batch {batch_size}, "
                            f"length {seq_len}, {n_runs} runs): raise --latency-batch / --latency-seq-len")
    check_seq_len(model, seq_len, flag="--latency-seq-len")
    run_device = place_model(model, device)
    vocab = _vocab_size(model, vocab_size)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=gen).to(run_device)
    mask = torch.ones_like(ids)
    extra = forward_kwargs(model)

    decode = is_causal_lm(model) and gen_tokens >= 2
    if decode:
        _check_decode_length(model, seq_len, gen_tokens)

    with eval_mode(model), torch.inference_mode():
        extra = {**extra, **model_call_kwargs(model, ids)}
        forward = _timed(lambda: model(input_ids=ids, attention_mask=mask, **extra), run_device, n_warmup, n_runs)
        decode_ms: float | None = None
        if decode:
            steps: list[float] = []
            for run in range(max(1, n_warmup) + n_runs):
                seconds = _decode_seconds(model, ids, mask, gen_tokens, run_device)
                if run >= max(1, n_warmup):
                    steps.append(seconds)
            decode_ms = float(np.median(steps)) * 1e3

    median = float(np.median(forward))
    q25, q75 = (float(x) for x in np.percentile(forward, [25, 75]))
    return LatencyResult(batch_size=batch_size, seq_len=seq_len, forward_ms_median=median * 1e3,
                         forward_ms_iqr=(q25 * 1e3, q75 * 1e3), tokens_per_second=batch_size * seq_len / median,
                         decode_ms_per_token=decode_ms, gen_tokens=gen_tokens if decode else 0,
                         threads=torch.get_num_threads(), device=str(run_device), dtype=str(_dtype(model)).replace(
                             "torch.", ""))


# ---------------------------------------------------------------------------------------------
# several models, interleaved


@dataclass
class ComparedLatency(LatencyResult):
    """One model's times from :func:`compare_latency`: a LatencyResult plus its ratios to the baseline model.

    ``forward_ratio`` / ``decode_ratio`` = median over rounds of (this model's time / the baseline's time in
    the same round); 1.0 for the baseline itself. ``forward_ms_rounds`` / ``decode_ms_rounds``: every timed
    round, in order. ``last_logits_only``: the forward computed the last position's logits only.
    """

    baseline: str = ""
    rounds: int = 0
    forward_ratio: float = 1.0
    decode_ratio: float | None = None
    last_logits_only: bool = False
    forward_ms_rounds: list[float] = field(default_factory=list)
    decode_ms_rounds: list[float] = field(default_factory=list)


def rotated(names: Sequence[str], round_index: int) -> list[str]:
    """The order of ``names`` in round ``round_index``: shifted by one each round (two models: A B, B A, A B...)."""
    shift = round_index % len(names) if names else 0
    return [*names[shift:], *names[:shift]]


def _takes_logits_to_keep(model: nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return False


def _once(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds taken by one call of ``fn``, timed by ``timeit.Timer`` (garbage collector off; CUDA synchronised)."""
    if device.type != "cuda":
        return timeit.Timer(fn).timeit(1)
    torch.cuda.synchronize(device)

    def call() -> None:
        fn()
        torch.cuda.synchronize(device)

    return timeit.Timer(call).timeit(1)


def _median_ratio(times: Sequence[float], reference: Sequence[float]) -> float:
    """Median over rounds of ``times[i] / reference[i]`` (a drift of the machine shared by both cancels)."""
    return float(np.median(np.asarray(times) / np.asarray(reference)))


def compare_latency(models: Mapping[str, nn.Module], *, seq_len: int = 128, batch_size: int = 1, repeats: int = 10,
                    warmup: int = 2, gen_tokens: int = 32, vocab_size: int | None = None,
                    baseline: str | None = None, last_logits_only: bool = True,
                    device: str | torch.device | None = None, seed: int = 0) -> dict[str, ComparedLatency]:
    """Time several models interleaved on the same seeded token ids, so their times can be compared.

    Each of ``warmup`` untimed then ``repeats`` timed rounds runs one forward of every model (order
    rotated each round), then for causal LMs one greedy generation of ``gen_tokens`` tokens (decode
    time per token, as in :func:`latency`; none when ``gen_tokens < 2``). Returns, per name in
    ``models``' order, the medians and the ratios to ``baseline`` (default: the first model).
    ``vocab_size`` None draws ids below the smallest vocabulary of the models; ``device`` None runs
    each model where it is. See the module docstring for the protocol.
    """
    names = list(models)
    if not names:
        raise PrunekitError("compare_latency needs at least one model")
    if batch_size < 1 or seq_len < 1 or repeats < 1 or warmup < 0:
        raise PrunekitError(f"latency needs positive batch size, sequence length and repeats (got batch "
                            f"{batch_size}, length {seq_len}, {repeats} repeats): raise --latency-batch / "
                            "--latency-seq-len")
    baseline = names[0] if baseline is None else baseline
    if baseline not in models:
        raise PrunekitError(f"baseline '{baseline}' is not one of the models compared: use one of {', '.join(names)}")
    devices = {name: place_model(model, device) for name, model in models.items()}
    for model in models.values():
        check_seq_len(model, seq_len, flag="--latency-seq-len")
    vocab = vocab_size if vocab_size is not None else min(_vocab_size(m, None) for m in models.values())
    ids_cpu = torch.randint(0, vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(seed))
    inputs = {name: ids_cpu.to(devices[name]) for name in names}
    decoders = [name for name in names if gen_tokens >= 2 and is_causal_lm(models[name])]
    for name in decoders:
        _check_decode_length(models[name], seq_len, gen_tokens)
    last_only = {name: last_logits_only and is_causal_lm(models[name]) and _takes_logits_to_keep(models[name])
                 for name in names}

    def forward_call(name: str) -> Callable[[], Any]:
        model, ids = models[name], inputs[name]
        extra = {**forward_kwargs(model), **model_call_kwargs(model, ids),
                 **({"logits_to_keep": 1} if last_only[name] else {})}
        return lambda: model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra)

    calls = {name: forward_call(name) for name in names}
    forward: dict[str, list[float]] = {name: [] for name in names}
    decode: dict[str, list[float]] = {name: [] for name in decoders}
    with contextlib.ExitStack() as stack, torch.inference_mode():
        for model in models.values():
            stack.enter_context(eval_mode(model))
        for round_index in range(warmup + repeats):
            timed = round_index >= warmup
            order = rotated(names, round_index)
            for name in order:
                seconds = _once(calls[name], devices[name])
                if timed:
                    forward[name].append(seconds)
            for name in (name for name in order if name in decode):
                ids = inputs[name]
                seconds = _decode_seconds(models[name], ids, torch.ones_like(ids), gen_tokens, devices[name])
                if timed:
                    decode[name].append(seconds)

    results: dict[str, ComparedLatency] = {}
    for name in names:
        decode_ratio = _median_ratio(decode[name], decode[baseline]) if name in decode and baseline in decode else None
        median = float(np.median(forward[name]))
        q25, q75 = (float(x) * 1e3 for x in np.percentile(forward[name], [25, 75]))
        results[name] = ComparedLatency(
            batch_size=batch_size, seq_len=seq_len, forward_ms_median=median * 1e3, forward_ms_iqr=(q25, q75),
            tokens_per_second=batch_size * seq_len / median,
            decode_ms_per_token=float(np.median(decode[name])) * 1e3 if name in decode else None,
            gen_tokens=gen_tokens if name in decode else 0, threads=torch.get_num_threads(),
            device=str(devices[name]), dtype=str(_dtype(models[name])).replace("torch.", ""), baseline=baseline,
            rounds=repeats, forward_ratio=_median_ratio(forward[name], forward[baseline]), decode_ratio=decode_ratio,
            last_logits_only=last_only[name], forward_ms_rounds=[t * 1e3 for t in forward[name]],
            decode_ms_rounds=[t * 1e3 for t in decode.get(name, [])])
    return results
