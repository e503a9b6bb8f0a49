"""Wall-clock speed of a model: one forward pass, and per generated token for causal LMs.

Protocol: random token ids (seeded) of shape (batch_size, seq_len); ``n_warmup`` untimed runs, then
``n_runs`` timed ones with ``time.perf_counter`` (CUDA synchronised on a GPU); the median and the
quartiles are reported. Decoding: ``model.generate`` greedy with the KV cache, ``gen_tokens`` new tokens
after a ``seq_len`` prompt; a streamer notes when each new token comes out, so one run's time per
generated token = (time of the last token - time of the first) / (gen_tokens - 1): the prefill (which
yields the first token) is left out. The median over ``n_runs`` runs is reported.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.generation.streamers import BaseStreamer

from prunekit.errors import PrunekitError
from prunekit.evaluate.perplexity import check_seq_len, eval_mode, forward_kwargs, max_positions, place_model


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
    """True for models that generate text: a ``generate`` method and a decoder config or a *ForCausalLM class."""
    if not callable(getattr(model, "generate", None)):
        return False
    config = getattr(model, "config", None)
    return bool(getattr(config, "is_decoder", False)) or type(model).__name__.endswith(
        ("ForCausalLM", "LMHeadModel"))


def _timed(fn: Callable[[], Any], device: torch.device, n_warmup: int, n_runs: int) -> list[float]:
    """Seconds taken by each of ``n_runs`` calls of ``fn`` after ``n_warmup`` untimed calls."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(n_warmup):
        fn()
    sync()
    times: list[float] = []
    for _ in range(n_runs):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


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


def latency(model: nn.Module, batch_size: int = 1, seq_len: int = 128, n_warmup: int = 2, n_runs: int = 10,
            gen_tokens: int = 32, vocab_size: int | None = None, device: str | torch.device | None = None,
            seed: int = 0) -> LatencyResult:
    """Time forward passes (and greedy decoding for causal LMs) on seeded random tokens; see the module docstring.

    ``device`` None runs where the model is. Decode time needs ``gen_tokens >= 2``; with fewer it is None.
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
        limit = max_positions(model)
        if limit is not None and seq_len + gen_tokens > limit:
            raise PrunekitError(f"a {seq_len}-token prompt plus {gen_tokens} generated tokens is above the model's "
                                f"limit of {limit}: lower --latency-seq-len or --gen-tokens")

    with eval_mode(model), torch.inference_mode():
        forward = _timed(lambda: model(input_ids=ids, attention_mask=mask, **extra), run_device, n_warmup, n_runs)
        decode_ms: float | None = None
        if decode:
            pad = getattr(getattr(model, "config", None), "eos_token_id", None)
            if isinstance(pad, (list, tuple)):
                pad = pad[0] if pad else None
            steps: list[float] = []
            for run in range(max(1, n_warmup) + n_runs):
                clock = _StepClock(run_device)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model.generate(  # type: ignore[operator]
                        input_ids=ids, attention_mask=mask, max_new_tokens=gen_tokens, min_new_tokens=gen_tokens,
                        do_sample=False, use_cache=True, pad_token_id=pad if pad is not None else 0, streamer=clock)
                if run >= max(1, n_warmup):
                    steps.append(clock.decode_seconds())
            decode_ms = float(np.median(steps)) * 1e3

    median = float(np.median(forward))
    q25, q75 = (float(x) for x in np.percentile(forward, [25, 75]))
    return LatencyResult(batch_size=batch_size, seq_len=seq_len, forward_ms_median=median * 1e3,
                         forward_ms_iqr=(q25 * 1e3, q75 * 1e3), tokens_per_second=batch_size * seq_len / median,
                         decode_ms_per_token=decode_ms, gen_tokens=gen_tokens if decode else 0,
                         threads=torch.get_num_threads(), device=str(run_device), dtype=str(_dtype(model)).replace(
                             "torch.", ""))
