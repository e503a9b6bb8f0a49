"""Perplexity with sequential onloading (`prunekit eval --onload`, `prunekit prune --onload ... --eval`).

The model is a skeleton on the ``meta`` device (:func:`prunekit.onload.build_skeleton`) and an
:class:`prunekit.onload.Onloader` reads each block's weights from the safetensors files only while it
runs. The windows are those of :func:`prunekit.evaluate.perplexity.perplexity` (same planning, batching,
BOS token, labels and loss code), but the order of the work is turned around:

1. every window is embedded and what each block receives is captured (hidden states, masks, rotary
   embeddings per layer type: :func:`prunekit.calibration.capture.capture_block_inputs`);
2. the engine (:func:`prunekit.calibration.engine.run_blockwise`, with the Onloader as its placement)
   reads block 1 from the files, runs every window through it, frees it, then block 2, ... ;
3. the model's own forward runs once more per batch of windows with every block replaced by a stand-in
   that hands on the last block's output, so the final norm, the head (and whatever a family adds, such
   as Gemma's logit soft-capping) compute the logits, scored exactly as a full load scores them.

Why block by block and not accelerate's disk offload (``device_map`` with blocks on ``"disk"``): it is
the engine prunekit already trusts for the onloaded prune (the same capture, the same placement, the
same ``peak_blocks`` bound), it reads the source safetensors files in place without an offload copy,
and each block's matmuls see the very inputs of a full load, batch for batch, so the perplexity is the
full load's to float precision (the tests ask for 1e-5; on CPU it is bit-equal, smollm2-135m included).
Peak memory is the runtime, one block at a time (``Onloader.peak_blocks``), the embeddings and head
while they run, the hidden states of all windows (``windows x seq_len x hidden`` floats: 19 MB for 8192
tokens of smollm2-135m) and one batch's logits, as in a full load (smollm2-135m, 8192 austen tokens:
peak RSS 0.81 GB onloaded, 1.21 GB loaded whole). Sizes come from the skeleton (shapes and dtypes) and
from nonzero counts taken while each block is in memory.

What it cannot do is said in one line on stderr: lm-eval ``--tasks`` and accuracy on labelled data
load the whole model; latency is not timed (every forward would read the weights from the files).
"""

from __future__ import annotations

import platform
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.calibration.engine import BlockVisitor
from prunekit.errors import PrunekitError
from prunekit.evaluate.perplexity import PerplexityResult
from prunekit.evaluate.size import SizeReport
from prunekit.onload import Onloader, OnloadUnsupported
from prunekit.onload_job import OnloadPlan, note

ONLOAD_PROTOCOL = ("sequential onloading: weights read from the safetensors files one block at a time; every window "
                   "runs through a block before the next block is read; same windows, batches and loss as a full "
                   "load")
LATENCY_NOTE = ("latency is not timed with sequential onloading (every forward would read the weights from the "
                "files): use --onload never to time it, or --no-latency")


class _CountingOnloader(Onloader):
    """An :class:`Onloader` that counts each parameter's nonzero entries the first time it is in memory."""

    def __init__(self, model: nn.Module, folder: Path) -> None:
        super().__init__(model, folder)
        self.nonzero: dict[str, int] = {}

    def _count(self, names: list[str]) -> None:
        from prunekit.evaluate.size import count_nonzero

        for name in names:
            if name not in self.nonzero and name in self.loaded:
                self.nonzero[name] = count_nonzero(self.groups[name].parameter)

    @contextmanager
    def outside(self, model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> Iterator[None]:
        with super().outside(model, blocks, device):
            self._count(self.outside_groups)
            yield

    def enter(self, block: nn.Module, device: torch.device) -> None:
        super().enter(block, device)
        self._count(self.block_groups[id(block)])


class _LastOutputs(BlockVisitor):
    """Changes nothing; keeps the hidden states the last block returned, one tensor per batch of windows."""

    modifies = False

    def __init__(self, last: int) -> None:
        self.last = last
        self.hidden: list[torch.Tensor] = []

    def outputs(self, index: int, hidden: list[torch.Tensor]) -> None:
        if index == self.last:
            self.hidden = list(hidden)


# ---- planning -----------------------------------------------------------------------------------------------------
def folder_refusal(folder: Path) -> str | None:
    """Why the folder's weights cannot be read block by block into its config's model (None: they can)."""
    from prunekit.compressed_load import compression_config
    from prunekit.models import RECORD_NAME, loader_for_config, read_record

    if compression_config(folder) is not None:
        return "its weights are stored compressed (they are decompressed by a full load)"
    loader = read_record(folder).get("loader") if (folder / RECORD_NAME).exists() else None
    if not loader:
        from transformers import AutoConfig

        loader = loader_for_config(AutoConfig.from_pretrained(str(folder)))
    if loader:
        return "the folder needs prunekit's own loader (its shapes differ from its config)"
    return None


def folder_task(folder: Path, builtin: str | None = None) -> str:
    """The task of a folder's model: the built-in's, its record's, or the one its config's architectures name."""
    from transformers import AutoConfig

    from prunekit.models import BUILTIN_MODELS, RECORD_NAME, infer_task, read_record

    if builtin:
        return BUILTIN_MODELS[builtin].task
    if (folder / RECORD_NAME).exists():
        task = read_record(folder).get("task")
        if isinstance(task, str) and task:
            return task
    return infer_task(AutoConfig.from_pretrained(str(folder)))


def eval_plan(settings: dict[str, Any], data: Any, tasks: list[str]) -> OnloadPlan | None:
    """`prunekit eval`: the plan when this evaluation is onloaded, None for a full load (a note says why if asked).

    ``--onload auto`` onloads when twice the weights' bytes exceed the memory available
    (:func:`prunekit.onload.should_onload`), as ``prunekit prune`` does.
    """
    from prunekit.data import TextData
    from prunekit.models import _check_config
    from prunekit.onload_job import onload_wanted

    wanted = onload_wanted(settings)
    if wanted is None:
        return None
    choice, folder, builtin, reason = wanted
    task = "causal-lm"
    if reason is None:
        _check_config(str(folder), settings["model"])  # an unknown model type: the full load's one-line error
        reason = folder_refusal(folder)
    if reason is None and tasks:
        reason = "--tasks runs lm-evaluation-harness on the whole model"
    if reason is None and data is not None and not isinstance(data, TextData):
        reason = "accuracy on labelled data is measured on the whole model"
    if reason is None:
        task = settings["task"] or folder_task(folder, builtin)
        if task != "causal-lm":
            reason = f"perplexity block by block needs a causal language model, not a {task} model"
    if reason is not None:
        note(f"sequential onloading (--onload {choice}) is not used: {reason}; loading the whole model")
        return None
    return OnloadPlan(folder, task)


# ---- perplexity ---------------------------------------------------------------------------------------------------
def onloaded_perplexity(model: nn.Module, onloader: Onloader, tokens: torch.Tensor, seq_len: int,
                        stride: int | None = None, max_tokens: int | None = None, batch_size: int = 1,
                        device: str | torch.device | None = None, progress: bool = True,
                        source: str = "the evaluation text", bos_token_id: int | None = None) -> PerplexityResult:
    """:func:`prunekit.evaluate.perplexity.perplexity` of a skeleton ``model`` whose weights ``onloader`` reads.

    Same arguments, same windows and result (see the module docstring for the order of the work).
    """
    from prunekit.adapters import get_adapter
    from prunekit.calibration.engine import run_blockwise
    from prunekit.evaluate.perplexity import (
        forward_kwargs,
        output_logits,
        perplexity_result,
        plan_perplexity,
        window_batches,
        window_nll,
    )
    from prunekit.utils import resolve_device

    plan = plan_perplexity(model, tokens, seq_len, stride, max_tokens, batch_size, bos_token_id)
    batches = list(window_batches(plan))
    blocks = get_adapter(model).stacks()[0]
    run_device = resolve_device(device)
    shape = _OutputShape(blocks[0])
    keep = _LastOutputs(len(blocks) - 1)
    try:
        run_blockwise(model, torch.cat([ids for ids, _ in batches]), keep, device=run_device,
                      micro_batch_size=plan.batch_size, progress=progress, desc="perplexity, block by block",
                      placement=onloader)
    finally:
        shape.remove()
    if len(keep.hidden) != len(batches):  # pragma: no cover - the engine replays every batch through every block
        raise RuntimeError(f"{len(keep.hidden)} outputs of the last block for {len(batches)} batches")
    total_nll, n_tokens = 0.0, 0
    extra = forward_kwargs(model)
    stand_ins = _HandOn(blocks, shape)
    with onloader.outside(model, blocks, run_device), stand_ins.installed(), torch.inference_mode():
        for (ids, labels), hidden in zip(batches, keep.hidden, strict=True):
            stand_ins.hidden = hidden
            logits = output_logits(model(input_ids=ids.to(run_device), **extra))
            nll, count = window_nll(logits, labels)
            total_nll += nll
            n_tokens += count
    return perplexity_result(plan, total_nll, n_tokens, source)


class _OutputShape:
    """What a block returns (a tensor, or a tuple of this length), seen on its first real call."""

    def __init__(self, block: nn.Module) -> None:
        self.length: int | None = None  # None: a bare tensor
        self.seen = False
        self.handle = block.register_forward_hook(self._hook)

    def _hook(self, _block: nn.Module, _args: Any, out: Any) -> None:
        if not self.seen:
            self.seen = True
            self.length = None if isinstance(out, torch.Tensor) else len(out)

    def remove(self) -> None:
        self.handle.remove()


class _HandOn:
    """Stand-ins for every block: the last returns the stored output of the last block, the others their input."""

    def __init__(self, blocks: nn.ModuleList, shape: _OutputShape) -> None:
        self.blocks = blocks
        self.shape = shape
        self.hidden: torch.Tensor | None = None

    def _forward(self, last: bool) -> Any:
        def forward(*args: Any, **kwargs: Any) -> Any:
            hidden = args[0] if args else kwargs.get("hidden_states")
            if last:
                hidden = self.hidden
            if self.shape.length is None:
                return hidden
            return (hidden, *[None] * (self.shape.length - 1))
        return forward

    @contextmanager
    def installed(self) -> Iterator[None]:
        saved = [(block, block.__dict__.get("forward")) for block in self.blocks]
        try:
            for position, block in enumerate(self.blocks):
                block.forward = self._forward(position == len(self.blocks) - 1)
            yield
        finally:
            for block, forward in saved:
                if forward is None:
                    block.__dict__.pop("forward", None)
                else:
                    block.forward = forward


def onloaded_size(model: nn.Module, onloader: _CountingOnloader, path: str | Path | None) -> SizeReport:
    """:func:`prunekit.evaluate.size.size_report` of a skeleton from the nonzero counts taken while onloaded."""
    from prunekit.evaluate.size import LayerSparsity, _weight, default_layers, disk_breakdown, runtime_of, weight_files
    from prunekit.utils import count_parameters, unique_tensors

    missing = [name for name in onloader.groups if name not in onloader.nonzero]
    if missing:  # pragma: no cover - every block and the rest of the model were read once
        raise RuntimeError(f"parameters never read while evaluating: {missing[:3]}")
    group_of = {(id(module), attr): name for name, group in onloader.groups.items()
                for _, module, attr in group.slots}
    total = count_parameters(model)
    nonzero = sum(onloader.nonzero.values())
    in_memory = sum(t.numel() * t.element_size() for t in (*unique_tensors(model.parameters()),
                                                           *unique_tensors(model.buffers())))
    rows: list[LayerSparsity] = []
    seen: set[str] = set()
    prunable = prunable_nonzero = 0
    for name, layer in default_layers(model).items():
        shape = tuple(_weight(layer).shape)  # (out, in); a layer without a weight: size_report's one-line error
        group = group_of.get((id(layer), "weight"))
        if group is None:  # pragma: no cover - every parameter of the model is a group
            raise RuntimeError(f"layer {name}: its weight is not a parameter of the model")
        count, nz = onloader.groups[group].parameter.numel(), onloader.nonzero[group]
        rows.append(LayerSparsity(name=name, shape=shape, params=count, nonzero=nz,
                                  sparsity=1.0 - nz / count if count else 0.0))
        if group not in seen:
            seen.add(group)
            prunable += count
            prunable_nonzero += nz
    on_disk = sum(f.stat().st_size for f in weight_files(path)) if path is not None else None
    by_kind, disk_format = disk_breakdown(path) if path is not None else (None, None)
    return SizeReport(total_params=total, nonzero_params=nonzero, prunable_params=prunable,
                      prunable_nonzero=prunable_nonzero,
                      prunable_sparsity=1.0 - prunable_nonzero / prunable if prunable else 0.0,
                      total_sparsity=1.0 - nonzero / total if total else 0.0, layers=rows, bytes_on_disk=on_disk,
                      bytes_in_memory=in_memory, disk_by_kind=by_kind, disk_format=disk_format,
                      runtime=runtime_of(model))


# ---- evaluation as `evaluate` returns it ----------------------------------------------------------------------------
def load_tokenizer(folder: Path) -> Any:
    """The folder's tokenizer as a full load gets it (pad token set to EOS when it has none)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PrunekitError(f"cannot load the tokenizer of '{folder}' ({first[:200]}): check the folder's "
                            "tokenizer files") from exc
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def evaluate_onloaded(folder: Path, task: str, tokenizer: Any, data: Any, *, split: str, seq_len: int = 512,
                      stride: int | None = None, max_tokens: int | None = None, batch_size: int = 1,
                      device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                      progress: bool = True, bos: bool = True, path: str | Path | None = None,
                      mode: str = "always") -> dict[str, Any] | None:
    """Perplexity on text ``data`` and size, as :func:`prunekit.evaluate.evaluate` returns them, onloaded.

    None when the model's parameters cannot be matched to the files' tensors (a note says so; the caller
    loads the whole model). ``path``: the folder whose weight files give bytes on disk.
    """
    from prunekit.data import eval_tokens
    from prunekit.evaluate.size import SIZE_PROTOCOL
    from prunekit.onload import build_skeleton
    from prunekit.utils import resolve_device, resolve_dtype

    model = build_skeleton(folder, task, resolve_dtype(dtype))
    try:
        onloader = _CountingOnloader(model, folder)
    except OnloadUnsupported as exc:
        note(f"sequential onloading is not used: {exc}; loading the whole model")
        return None
    run_device = resolve_device(device)
    protocol: dict[str, Any] = {"device": str(run_device), "threads": torch.get_num_threads(),
                                "torch": torch.__version__, "python": platform.python_version()}
    import transformers

    protocol["transformers"] = transformers.__version__
    protocol["data"] = getattr(data, "name", None)
    tokens = eval_tokens(tokenizer, data, split=split)
    bos_id = getattr(tokenizer, "bos_token_id", None) if bos else None
    ppl = onloaded_perplexity(model, onloader, tokens, seq_len=seq_len, stride=stride, max_tokens=max_tokens,
                              batch_size=batch_size, device=run_device, progress=progress,
                              source=f"{data.name}/{split}", bos_token_id=bos_id if isinstance(bos_id, int) else None)
    why = "" if ppl.bos_token_id is not None else (
        " (--no-bos)" if not bos else " (the tokenizer defines no BOS token)")
    protocol.update({"split": split, "perplexity": ppl.protocol + why})
    size = onloaded_size(model, onloader, path)
    protocol["size"] = SIZE_PROTOCOL if path is not None else SIZE_PROTOCOL.replace(
        "; bytes_on_disk = weight files only (*.safetensors)", "; bytes_on_disk not measured (no saved folder)")
    protocol["onload"] = ONLOAD_PROTOCOL
    return {"perplexity": asdict(ppl), "size": asdict(size), "protocol": protocol,
            "onload": {"mode": mode, "blocks_in_memory_at_most": onloader.peak_blocks,
                       "weights": "read block by block from the source files"}}
