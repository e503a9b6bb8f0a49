"""Perplexity of a causal language model over fixed-length windows of one token stream.

Protocol (stated in every result's ``protocol`` sentence):

* the first ``max_tokens`` tokens of the stream are used (all of them when None);
* with ``bos_token_id`` (what ``prunekit eval`` and ``prunekit prune --eval`` pass when the tokenizer
  defines a beginning-of-sequence token): every window is that token followed by ``seq_len - 1`` stream
  tokens, and every stream token in it is scored, the first one predicted from the BOS token alone. This
  is how lm-evaluation-harness scores a document that fits in one window (``loglikelihood_rolling``:
  BOS, then the text), and models such as Gemma need the BOS token at position 0;
* without it (``--no-bos``, or a tokenizer without a BOS token): every window is ``seq_len`` stream
  tokens, and its first token is context only (it has no context inside the window);
* ``stride`` None (the default): non-overlapping windows, each starting where the previous one ended; a
  final partial window is dropped;
* ``stride`` smaller than the stream tokens of a window: sliding windows starting every ``stride`` tokens;
  the first window is scored on all its scorable tokens, every later one only on the tokens not scored
  before (the last ``stride`` of them), the rest being context. If the stream does not end on a stride
  boundary, one last window is aligned to the end of the stream, so every token is scored exactly once
  (all ``n`` with a BOS token, all but the very first without).

Perplexity = exp(total negative log-likelihood / tokens scored), the NLL computed here from the logits
(float32 log-softmax) and summed in float64, so the token count is exact.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from prunekit.errors import PrunekitError
from prunekit.utils import resolve_device

IGNORE = -100


@dataclass
class PerplexityResult:
    """Perplexity and exactly what it was computed on."""

    perplexity: float
    nll: float  # mean negative log-likelihood per scored token, in nats
    n_tokens: int  # tokens scored
    seq_len: int
    stride: int
    n_windows: int
    protocol: str
    bos_token_id: int | None = None  # the token put before every window, or None


# ---------------------------------------------------------------------------------------------
# helpers shared by the evaluate modules


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model accepts (``max_position_embeddings`` or ``n_positions``), if known."""
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_decoder_only(model: nn.Module) -> None:
    """Perplexity here is a decoder-only language model's: an encoder-decoder model (T5, BART) is refused."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise PrunekitError(f"{type(model).__name__} is an encoder-decoder model: prunekit measures perplexity of "
                            "decoder-only language models only; prune it without --eval and evaluate it on your own "
                            "sequence-to-sequence task")


def check_seq_len(model: nn.Module, seq_len: int, flag: str = "--seq-len") -> None:
    """Refuse a sequence length above the model's position limit."""
    limit = max_positions(model)
    if limit is not None and seq_len > limit:
        raise PrunekitError(f"sequence length {seq_len} is above the model's limit of {limit}: lower {flag}")


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a model without parameters)."""
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def place_model(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """Device to run on: the model's own when ``device`` is None, else ``device`` (the model is moved there)."""
    if device is None:
        return model_device(model)
    target = resolve_device(device)
    if model_device(model) != target:
        model.to(target)
    return target


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put the model in eval mode for the block and restore its previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def output_logits(output: Any) -> torch.Tensor:
    """Logits from a model output (a ModelOutput, a tuple or a bare tensor)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None:
        logits = output[0]
    return logits


def forward_kwargs(model: nn.Module) -> dict[str, Any]:
    """Extra forward arguments: no KV cache for Hugging Face models (one pass per window needs none)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return {}
    return {"use_cache": False} if isinstance(model, PreTrainedModel) else {}


def model_call_kwargs(model: nn.Module, ids: torch.Tensor) -> dict[str, Any]:
    """What one timed forward passes besides input_ids: an encoder-decoder model also decodes the same ids."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return {"decoder_input_ids": ids}
    return {}


# ---------------------------------------------------------------------------------------------
# windows


def plan_windows(n: int, seq_len: int, stride: int, score_first: bool = False) -> list[tuple[int, int]]:
    """(start, first scored position) of every window over ``n`` tokens; each window is ``seq_len`` stream tokens.

    Positions are absolute indices into the stream; a window starting at ``s`` scores positions
    ``first .. s + seq_len - 1``. ``score_first`` (a BOS token precedes the window): the window's first
    token can be scored too; without it, it is context only.
    """
    offset = 0 if score_first else 1
    windows: list[tuple[int, int]] = []
    if stride >= seq_len:
        for start in range(0, n - seq_len + 1, seq_len):
            windows.append((start, start + offset))
        return windows
    scored_to = 0  # every position below this one is already scored
    starts = list(range(0, n - seq_len + 1, stride))
    if starts[-1] + seq_len < n:
        starts.append(n - seq_len)
    for start in starts:
        end = start + seq_len
        windows.append((start, max(scored_to, start + offset)))
        scored_to = end
    return windows


def describe(seq_len: int, stride: int, n_used: int, n_given: int, n_windows: int, n_tokens: int,
             source: str, bos_token_id: int | None = None) -> str:
    """The protocol as one human sentence (``seq_len``: model positions per window, BOS included)."""
    over = f"the first {n_used} tokens of {source}" if n_used < n_given else f"all {n_used} tokens of {source}"
    span = seq_len - 1 if bos_token_id is not None else seq_len
    if bos_token_id is not None:
        window = (f"each window the tokenizer's BOS token (id {bos_token_id}) followed by {span} text tokens, "
                  "all of them scored")
    else:
        window = "no BOS token, each window scored on all but its first token (context only)"
    if stride >= span:
        dropped = n_used - n_windows * span
        text = f"{n_windows} non-overlapping {seq_len}-token windows over {over}, {window} ({n_tokens} tokens scored)"
        if dropped:
            text += f"; the last {dropped} tokens, shorter than a window, are not scored"
        return text
    every = "every token" if bos_token_id is not None else "all but the first"
    return (f"{n_windows} sliding {seq_len}-token windows every {stride} tokens over {over}, {window} in the first "
            f"window; each later one is scored only on tokens not scored before (the rest is context), the last "
            f"window aligned to the end: {n_tokens} tokens scored ({every})")


# ---------------------------------------------------------------------------------------------
# perplexity


@dataclass
class WindowPlan:
    """The windows one perplexity run scores, checked against settings and model (:func:`plan_perplexity`)."""

    tokens: torch.Tensor  # the stream, cut to ``max_tokens``
    n_given: int  # tokens of the stream before the cut
    seq_len: int  # model positions per window, the BOS token included
    span: int  # stream tokens per window
    stride: int
    batch_size: int
    windows: list[tuple[int, int]]  # (start, first scored position), from plan_windows
    bos_token_id: int | None


def plan_perplexity(model: nn.Module, tokens: torch.Tensor, seq_len: int, stride: int | None = None,
                    max_tokens: int | None = None, batch_size: int = 1,
                    bos_token_id: int | None = None) -> WindowPlan:
    """Check the settings (one-line errors) and plan the windows of :func:`perplexity`; no forward pass.

    ``model`` is only read for its config (an encoder-decoder is refused, ``seq_len`` checked against its
    position limit), so a model whose weights are not in memory will do.
    """
    check_decoder_only(model)
    tokens = torch.as_tensor(tokens).reshape(-1).long()
    n_given = int(tokens.numel())
    bos = bos_token_id is not None
    if seq_len < 2:
        raise PrunekitError(f"sequence length {seq_len} is too short to score any token: use --seq-len 2 or more")
    span = seq_len - 1 if bos else seq_len  # stream tokens per window
    stride = span if stride is None else int(stride)
    if not 1 <= stride <= span:
        after = " after its BOS token" if bos else ""
        raise PrunekitError(f"stride {stride} must be between 1 and the {span} text tokens a {seq_len}-token window "
                            f"holds{after}: lower --stride or leave it out for non-overlapping windows")
    if batch_size < 1:
        raise PrunekitError(f"batch size {batch_size} must be at least 1: use --batch-size 1 or more")
    if max_tokens is not None:
        if max_tokens < 1:
            raise PrunekitError(f"max tokens {max_tokens} must be positive: raise --max-tokens or leave it out")
        tokens = tokens[:max_tokens]
    n = int(tokens.numel())
    check_seq_len(model, seq_len)
    if n < span:
        raise PrunekitError(f"only {n} tokens of evaluation text, fewer than one window of {span}: "
                            "lower --seq-len or give more text")
    windows = plan_windows(n, span, stride, score_first=bos)
    return WindowPlan(tokens=tokens, n_given=n_given, seq_len=seq_len, span=span, stride=stride,
                      batch_size=batch_size, windows=windows, bos_token_id=bos_token_id)


def window_batches(plan: WindowPlan) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(input ids, labels) of every forward pass: ``plan.batch_size`` consecutive windows (the last: what is left).

    Labels are the ids with every position that is not scored set to ``IGNORE``.
    """
    offsets = torch.arange(plan.span)
    shift = 1 if plan.bos_token_id is not None else 0  # input position of a window's first stream token
    for i in range(0, len(plan.windows), plan.batch_size):
        chunk = plan.windows[i:i + plan.batch_size]
        starts = torch.tensor([s for s, _ in chunk])
        ids = plan.tokens[starts[:, None] + offsets[None, :]]
        if plan.bos_token_id is not None:
            ids = torch.cat([torch.full((len(chunk), 1), plan.bos_token_id), ids], dim=1)
        labels = ids.clone()
        for row, (start, first) in enumerate(chunk):
            labels[row, : first - start + shift] = IGNORE
        yield ids, labels


def window_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """(summed negative log-likelihood, tokens scored) of one forward pass's logits against its labels."""
    if logits.dim() != 3:
        raise PrunekitError("the model has no language-modelling head (its logits are not per token): "
                            "perplexity needs a causal LM; evaluate a classifier on a labelled set")
    shifted = logits[:, :-1, :].float()
    targets = labels[:, 1:].to(shifted.device)
    losses = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1),
                             ignore_index=IGNORE, reduction="none")
    return float(losses.double().sum().item()), int((targets != IGNORE).sum().item())


def perplexity_result(plan: WindowPlan, total_nll: float, n_tokens: int, source: str) -> PerplexityResult:
    """The result of a run over ``plan``'s windows from its summed NLL and token count, with its protocol sentence."""
    mean_nll = total_nll / n_tokens
    if not math.isfinite(mean_nll):
        raise PrunekitError("the model produced non-finite logits, so perplexity is undefined: "
                            "evaluate in float32 (--dtype float32) or check the pruned weights")
    try:
        ppl = math.exp(mean_nll)
    except OverflowError:
        ppl = math.inf
    n = int(plan.tokens.numel())
    protocol = describe(plan.seq_len, plan.stride, n, plan.n_given, len(plan.windows), n_tokens, source,
                        plan.bos_token_id)
    return PerplexityResult(perplexity=ppl, nll=mean_nll, n_tokens=n_tokens, seq_len=plan.seq_len,
                            stride=plan.stride, n_windows=len(plan.windows), protocol=protocol,
                            bos_token_id=plan.bos_token_id)


def perplexity(model: nn.Module, tokens: torch.Tensor, seq_len: int, stride: int | None = None,
               max_tokens: int | None = None, batch_size: int = 1, device: str | torch.device | None = None,
               progress: bool = True, source: str = "the evaluation text",
               bos_token_id: int | None = None) -> PerplexityResult:
    """Perplexity of a causal LM on the 1-D token stream ``tokens`` (see the module docstring for the protocol).

    ``seq_len`` is the number of model positions per window (the BOS token included when
    ``bos_token_id`` is given); ``device`` None runs where the model is; ``source`` names the text in the
    protocol sentence. (:mod:`prunekit.onload_eval` scores the same windows with the model's blocks read
    from the files one at a time.)
    """
    plan = plan_perplexity(model, tokens, seq_len, stride, max_tokens, batch_size, bos_token_id)
    run_device = place_model(model, device)
    extra = forward_kwargs(model)
    total_nll = 0.0
    n_tokens = 0
    with eval_mode(model), torch.inference_mode():
        bar = tqdm(total=len(plan.windows), desc="perplexity", unit="window", disable=not progress, leave=False)
        for ids, labels in window_batches(plan):
            logits = output_logits(model(input_ids=ids.to(run_device), **extra))
            nll, count = window_nll(logits, labels)
            total_nll += nll
            n_tokens += count
            bar.update(len(ids))
        bar.close()
    return perplexity_result(plan, total_nll, n_tokens, source)
