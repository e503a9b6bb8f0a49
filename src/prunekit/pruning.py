"""Public API of one-shot pruning: ``prune(model, config, calibration)``.

    from prunekit.pruning import prune
    result = prune(model, {"method": "wanda", "sparsity": 0.5}, calibration)   # model pruned in place
    result = prune(model, method_config("sparsegpt", structure="2:4"), calibration)

``config`` is a method's config (see :mod:`prunekit.methods`) or a dict with a ``method`` key.
Layer-wise methods (magnitude, random, wanda, sparsegpt) prune the linear layers inside the
transformer blocks (embeddings and LM head never, unless ``include_lm_head``), filtered by
``include``/``exclude`` fnmatch patterns on full module names. Structured methods get their config
as is and change the model's shapes.
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prunekit.adapters import get_adapter, is_linear, weight_view
from prunekit.calibration import (
    BlockInputs,
    BlockPlacement,
    BlockVisitor,
    EngineReport,
    Observer,
    run_blockwise,
    single_thread,
)
from prunekit.errors import PrunekitError
from prunekit.masks import Structure, apply_mask, check_nm, layer_report, total_sparsity
from prunekit.methods import config_for
from prunekit.methods.base import LayerwiseMethod, SparsityConfig
from prunekit.methods.registry import MethodConfig, MethodSpec

ONE_SHOT_KINDS = ("one-shot", "structured")
ONLOADED_STRUCTURED = ("heads-neurons", "blocks")  # structured methods that sequential onloading runs


def resolve_config(config: MethodConfig | dict[str, Any]) -> tuple[MethodSpec, MethodConfig]:
    """(method, validated config) for :func:`prune`: one-shot and structured methods only."""
    spec, resolved = config_for(config, ONE_SHOT_KINDS)
    resolved.ready()
    return spec, resolved


@dataclass
class PruneResult:
    """What a pruning run did: achieved sparsity per layer, settings and timing (seconds)."""

    config: MethodConfig
    target_sparsity: float | None
    sparsity: float  # achieved over the selected layers (zeros / weights)
    layers: dict[str, dict[str, Any]]  # full name -> shape, params, nonzero, sparsity, target
    block_sparsity: list[float] | None = None
    outlier_ratios: list[float] | None = None
    timing: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    kind: str = "one-shot"

    @property
    def method(self) -> str:
        return type(self.config).method

    def record(self) -> dict[str, Any]:
        """The pruning part of a prunekit record: method, resolved settings, sparsity, timing, method facts."""
        sparsity: dict[str, Any] = {"target": self.target_sparsity, "total": self.sparsity,
                                    "layers": {name: info["sparsity"] for name, info in self.layers.items()}}
        if self.block_sparsity is not None:
            sparsity["blocks"] = self.block_sparsity
        if self.outlier_ratios is not None:
            sparsity["outlier_ratios"] = self.outlier_ratios
        out: dict[str, Any] = {"method": self.method, "kind": self.kind, "method_settings": self.config.to_dict(),
                               "sparsity": sparsity, "timing": dict(self.timing)}
        if self.extra:
            out["method_result"] = self.extra
        return out


def select_layers(model: nn.Module, config: Any) -> list[dict[str, nn.Module]]:
    """The layers to prune, per block (full module name -> layer), after the config's include/exclude patterns."""
    adapter = get_adapter(model)
    per_block: list[dict[str, nn.Module]] = []
    for block_name, block in adapter.all_blocks():  # every stack: an encoder-decoder's encoder, then its decoder
        chosen = {f"{block_name}.{name}": layer for name, layer in adapter.block_linears(block).items()}
        per_block.append({name: layer for name, layer in chosen.items() if _wanted(name, config)})
    return per_block


def _wanted(name: str, config: Any) -> bool:
    if config.include and not any(fnmatch.fnmatchcase(name, p) for p in config.include):
        return False
    return not (config.exclude and any(fnmatch.fnmatchcase(name, p) for p in config.exclude))


def _embedding_module(model: nn.Module, getter: str) -> Any:
    """model.get_input_embeddings() / get_output_embeddings(), or None for models without them."""
    method = getattr(model, getter, None)
    return method() if callable(method) else None


def _lm_head(model: nn.Module) -> dict[str, nn.Module]:
    head = _embedding_module(model, "get_output_embeddings")
    if head is None or not is_linear(head):
        raise PrunekitError("include_lm_head: this model has no linear LM head")
    embeddings = _embedding_module(model, "get_input_embeddings")
    if embeddings is not None and embeddings.weight.data_ptr() == head.weight.data_ptr():
        raise PrunekitError("include_lm_head: the LM head shares its weights with the input embeddings, so "
                            "pruning it would prune the embeddings too: leave the head out")
    name = next(n for n, m in model.named_modules() if m is head)
    return {name: head}


def check_calibration(model: nn.Module, calibration: torch.Tensor | None, method: str) -> torch.Tensor:
    """A clear error unless ``calibration`` is a LongTensor [samples, seq_len] of ids the model knows."""
    if calibration is None:
        raise PrunekitError(f"method {method} needs calibration data: pass a LongTensor [samples, seq_len] "
                            "(prunekit.data.calibration_batch) or --calib NAME")
    if not isinstance(calibration, torch.Tensor) or calibration.dim() != 2 or calibration.dtype != torch.long:
        raise PrunekitError("calibration must be a LongTensor [samples, seq_len] of token ids "
                            "(see prunekit.data.calibration_batch)")
    if calibration.numel() == 0:
        raise PrunekitError("calibration is empty: give at least one sample of at least one token")
    vocab = getattr(_embedding_module(model, "get_input_embeddings"), "num_embeddings", None)
    if vocab is not None and (int(calibration.max()) >= vocab or int(calibration.min()) < 0):
        raise PrunekitError(f"calibration holds token ids outside the model's vocabulary of {vocab}: "
                            "tokenise it with this model's tokenizer")
    return calibration


class _PruneVisitor(BlockVisitor):
    """Engine visitor: one method instance per input stream; prune every selected layer of the block.

    ``permute``: block index -> full name of the FFN output layer whose input channels are reordered
    (with the layers producing them) before its N:M mask is chosen.
    """

    def __init__(self, cls: type[LayerwiseMethod], config: SparsityConfig, layers_by_block: list[dict[str, nn.Module]],
                 block_sparsity: list[float], structure: Structure, permute: dict[int, str] | None = None,
                 adapter: Any = None) -> None:
        self.cls = cls
        self.config = config
        self.layers_by_block = layers_by_block
        self.block_sparsity = block_sparsity
        self.structure = structure
        self.reports: dict[str, dict[str, Any]] = {}  # counted right after pruning (an onloaded block is freed)
        self.permute = permute or {}
        self.adapter = adapter
        self.permutations: dict[str, dict[str, Any]] = {}
        self.refinements: dict[str, dict[str, Any]] = {}
        self.reconstructions: list[dict[str, Any]] = []
        self.wants_dense_outputs = config.reconstruct_steps > 0
        self.sequential = bool(getattr(config, "sequential", False))
        self.stream_of: dict[str, int] = {}
        self.threads = torch.get_num_threads()

    def layers(self, index: int, block: nn.Module) -> dict[str, nn.Module]:
        return self.layers_by_block[index]

    def observer(self, name: str, layer: nn.Module, in_features: int) -> Observer:
        method = self.cls(self.config, in_features, key=name)
        if self.config.refine != "none" and not callable(getattr(method, "gram", None)):
            return _WithGram(method, in_features)  # the refinement needs XᵀX, which this method does not collect
        return method

    def finish(self, index: int, block: nn.Module, layers: dict[str, nn.Module],
               observers: dict[str, Observer]) -> None:
        self.stream_of = {name: id(observer) for name, observer in observers.items()}
        grams = _stream_grams(observers) if self.config.refine != "none" else {}
        for name, layer in layers.items():
            method = _method_of(observers[name])
            if self.permute.get(index) == name:
                self._permute(block, name, layer, method, grams)
            dense = weight_view(layer).clone() if grams else None
            apply_mask(layer, method.prune(layer, self.block_sparsity[index], self.structure))
            if dense is not None:
                self._refine(name, layer, dense, grams[id(observers[name])])
        self.reports.update(layer_report(layers))

    def refit(self, index: int, position: int, block: nn.Module, inputs: list[BlockInputs],
              dense: list[torch.Tensor]) -> None:
        """Block-output reconstruction (:mod:`prunekit.methods.reconstruct`): kept weights fitted, masks fixed."""
        from prunekit.methods.reconstruct import reconstruct_block

        facts = reconstruct_block(block, self.layers_by_block[index], inputs, dense, position,
                                  self.config.reconstruct_steps, self.config.reconstruct_lr)
        self.reconstructions.append({"block": index, **facts})
        self.reports.update(layer_report(self.layers_by_block[index]))  # counted again after the fit

    def _refine(self, name: str, layer: nn.Module, dense: torch.Tensor, gram: torch.Tensor) -> None:
        """Mask refinement after the method (:mod:`prunekit.methods.refine`): same sparsity, same N:M."""
        from prunekit.methods.refine import swap_refine

        # many small elementwise steps: on the engine's single thread (a thread barrier per step costs more)
        self.refinements[name] = swap_refine(weight_view(layer), dense, gram, self.structure,
                                             self.config.refine_iterations)

    def _permute(self, block: nn.Module, name: str, layer: nn.Module, method: LayerwiseMethod,
                 grams: dict[int, torch.Tensor]) -> None:
        """Reorder the FFN's intermediate channels (producers' rows, this layer's inputs, the method's statistics)."""
        from prunekit.methods.permutation import channel_permutation

        scores = getattr(method, "scores", None)
        reorder = getattr(method, "permute_inputs", None)
        if scores is None or reorder is None:  # pragma: no cover - configs without scores take no permute
            raise PrunekitError(f"method {self.config.method} has no scores to permute by: drop permute")
        order, facts = channel_permutation(scores(layer), self.structure)  # elementwise steps: one thread
        if bool((order == torch.arange(order.numel())).all()):
            facts["changed"] = []
        else:
            facts["changed"] = self.adapter.permute_ffn_channels(block, order)
            reorder(order)
            key = self.stream_of[name]
            if key in grams:  # the FFN output layer's stream is its own: its XᵀX follows the new order
                grams[key] = grams[key][order][:, order]
        self.permutations[name] = facts


class _WithGram:
    """An observer that feeds a method and a :class:`~prunekit.methods.refine.GramObserver` the same inputs."""

    def __init__(self, method: LayerwiseMethod, in_features: int) -> None:
        from prunekit.methods.refine import GramObserver

        self.method = method
        self.gram = GramObserver(in_features)

    def add_batch(self, inputs: torch.Tensor) -> None:
        self.method.add_batch(inputs)
        self.gram.add_batch(inputs)


def _method_of(observer: Observer) -> LayerwiseMethod:
    method = observer.method if isinstance(observer, _WithGram) else observer
    assert isinstance(method, LayerwiseMethod)
    return method


def _stream_grams(observers: dict[str, Observer]) -> dict[int, torch.Tensor]:
    """XᵀX of every input stream (by observer identity), taken before any layer is pruned (SparseGPT frees it)."""
    grams: dict[int, torch.Tensor] = {}
    for observer in observers.values():
        if id(observer) in grams:
            continue
        if isinstance(observer, _WithGram):
            grams[id(observer)] = observer.gram.matrix()
        else:
            grams[id(observer)] = getattr(observer, "gram")()  # noqa: B009 - methods that collect XᵀX themselves
    return grams


def _resolve_run_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    from prunekit.utils import resolve_device

    if device is None:
        param = next(model.parameters(), None)
        return param.device if param is not None and param.device.type != "meta" else torch.device("cpu")
    return resolve_device(device)


def prune(model: nn.Module, config: MethodConfig | dict[str, Any], calibration: torch.Tensor | None = None, *,
          device: str | torch.device | None = None, progress: bool = True,
          placement: BlockPlacement | None = None) -> PruneResult:
    """Prune ``model`` in place by ``config``; ``calibration`` is a LongTensor [samples, seq_len] of token ids.

    ``device`` is where each block and the activations are computed (default: the model's device);
    the rest of the model stays where it is. ``placement`` brings each block's weights in and takes
    them away (sequential onloading, :mod:`prunekit.onload`: layer-wise methods only, see
    :func:`onload_refusal`; structured methods are onloaded by :mod:`prunekit.onload_structured`).
    """
    spec, config = resolve_config(config)
    if placement is not None:
        reason = onload_refusal(spec, config)
        if reason:
            raise PrunekitError(f"sequential onloading cannot run {reason}: load the whole model")
        if spec.kind == "structured":
            raise PrunekitError(f"{spec.name} changes shapes, so it writes its output itself when onloaded: use "
                                "prunekit.onload_structured.prune_structured")
    if config.needs_calibration():
        calibration = check_calibration(model, calibration, spec.name)
    run_device = _resolve_run_device(model, device)
    started = time.perf_counter()
    if spec.kind == "structured":
        facts = spec.implementation(model, config, calibration, run_device, progress) or {}
        layers = get_adapter(model).prunable_layers()
        return _result(config, None, layers, {name: None for name in layers}, None, None,
                       {"total_s": time.perf_counter() - started}, facts, kind=spec.kind)

    assert isinstance(config, SparsityConfig)
    cls = spec.implementation
    structure = config.structure_spec()
    target = config.target_sparsity()
    layers_by_block = select_layers(model, config)
    extra_layers = _lm_head(model) if getattr(config, "include_lm_head", False) else {}
    every = {name: layer for block in layers_by_block for name, layer in block.items()} | extra_layers
    if not every:
        example = next(iter(get_adapter(model).prunable_layers()), "?")
        raise PrunekitError(f"no layer matches include={config.include} exclude={config.exclude}: patterns are "
                            f"fnmatch on full module names such as '{example}'")
    for name, layer in every.items():
        check_nm(weight_view(layer).shape[1], structure, name)

    timing: dict[str, float] = {}
    block_sparsity = [target] * len(layers_by_block)
    ratios: list[float] | None = None
    if config.allocation == "owl":
        from prunekit.methods.owl import owl_allocation

        assert calibration is not None
        start = time.perf_counter()
        block_sparsity, ratios = owl_allocation(model, calibration, config, target, layers_by_block,
                                                device=run_device, micro_batch_size=config.micro_batch_size,
                                                progress=progress, placement=placement)
        timing["owl_s"] = time.perf_counter() - start
    targets = {name: block_sparsity[i] for i, block in enumerate(layers_by_block) for name in block}
    targets.update({name: target for name in extra_layers})

    permute = _permutable_layers(model, config, layers_by_block)
    extra: dict[str, Any] = {}
    reports: dict[str, dict[str, Any]] = {}
    start = time.perf_counter()
    if _reads_inputs(cls) or config.refines():
        calibration = check_calibration(model, calibration, spec.name)
        visitor = _PruneVisitor(cls, config, layers_by_block, block_sparsity, structure, permute, get_adapter(model))
        engine = run_blockwise(model, calibration, visitor, device=run_device,
                               micro_batch_size=config.micro_batch_size, progress=progress, desc=spec.name,
                               placement=placement)
        timing.update(_engine_timing(engine))
        reports = visitor.reports
        if getattr(config, "permute", False):
            extra["permutation"] = _permutation_facts(visitor.permutations)
        if visitor.refinements:
            extra["refine"] = _refine_facts(config, visitor.refinements)
        if visitor.reconstructions:
            extra["reconstruct"] = _reconstruct_facts(config, visitor.reconstructions)
    elif placement is not None:
        reports = _prune_blocks_without_data(model, cls, config, layers_by_block, targets, structure, placement,
                                             run_device, progress)
    else:
        _prune_without_data(cls, config, every, targets, structure, target)
    timing["prune_s"] = time.perf_counter() - start
    timing["total_s"] = time.perf_counter() - started
    return _result(config, target, every, targets, block_sparsity if config.allocation == "owl" else None,
                   ratios, timing, extra, reports=reports)


def onload_refusal(spec: MethodSpec, config: MethodConfig) -> str | None:
    """Why ``config`` cannot be pruned one block at a time with the rest of the model absent (None: it can).

    Structured methods (heads-neurons and blocks) are onloaded in two passes by :mod:`prunekit.onload_structured`.
    """
    if spec.kind == "structured" and spec.name in ONLOADED_STRUCTURED:
        if getattr(config, "importance", None) == "taylor":
            return f"{spec.name} with importance taylor (its gradients need the whole model at once)"
        return None
    if spec.kind != "one-shot" or not isinstance(config, SparsityConfig):
        return f"{spec.name} ({spec.kind}: it changes shapes across blocks)"
    if getattr(config, "include_lm_head", False):
        return f"{spec.name} with include_lm_head (the head is not a block)"
    if getattr(config, "compare", None) == "global":
        return f"{spec.name} with compare=global (it compares every layer at once)"
    return None


def _permutable_layers(model: nn.Module, config: Any, layers_by_block: list[dict[str, nn.Module]]) -> dict[int, str]:
    """Block index -> full name of its FFN output layer, whose channels ``permute`` reorders; refuses what cannot."""
    if not getattr(config, "permute", False):
        return {}
    adapter = get_adapter(model)
    refusal = adapter.ffn_permutation_refusal()
    if refusal:
        raise PrunekitError(refusal)
    consumer = adapter.ffn_output_name()
    found: dict[int, str] = {}
    for index, (block_name, _block) in enumerate(adapter.all_blocks()):
        name = f"{block_name}.{consumer}"
        if name in layers_by_block[index]:
            found[index] = name
    if not found:
        raise PrunekitError(f"permute reorders the input channels of the FFN output layers ({consumer}), but none is "
                            "pruned (include/exclude): prune them or drop permute")
    return found


def _permutation_facts(permutations: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What the record says of the channel permutations: which layers took one and what the N:M mask kept."""
    taken = {name: facts for name, facts in permutations.items() if facts["changed"]}
    return {"scope": "FFN intermediate channels (producers' rows and the FFN output layer's inputs, together)",
            "layers": sorted(taken), "unchanged": sorted(set(permutations) - set(taken)),
            "kept_score": {name: {"before": facts["kept_score_before"], "after": facts["kept_score_after"]}
                           for name, facts in permutations.items()}}


def _refine_facts(config: SparsityConfig, refinements: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What the record says of the mask refinement: swaps made and the layers' output error before and after."""
    before = sum(facts["error_before"] for facts in refinements.values())
    after = sum(facts["error_after"] for facts in refinements.values())
    return {"method": config.refine, "iterations": config.refine_iterations,
            "swaps": sum(facts["swaps"] for facts in refinements.values()),
            "output_error_before": before, "output_error_after": after,
            "layers": {name: {"swaps": facts["swaps"], "error_before": facts["error_before"],
                              "error_after": facts["error_after"]} for name, facts in refinements.items()}}


def _reconstruct_facts(config: SparsityConfig, blocks: list[dict[str, Any]]) -> dict[str, Any]:
    """What the record says of the block reconstruction: steps, rate and each block's loss before and after."""
    return {"steps": config.reconstruct_steps, "lr": config.reconstruct_lr,
            "blocks_kept": sum(1 for block in blocks if block.get("kept")), "blocks": blocks}


def _reads_inputs(cls: type[LayerwiseMethod]) -> bool:
    """True when the method collects statistics from layer inputs (it overrides add_batch)."""
    return cls.add_batch is not LayerwiseMethod.add_batch


def _prune_without_data(cls: type[LayerwiseMethod], config: SparsityConfig, layers: dict[str, nn.Module],
                        targets: dict[str, float], structure: Structure, target: float) -> None:
    """Methods that read only the weights: all at once (global comparison) or layer by layer."""
    device = weight_view(next(iter(layers.values()))).device
    with torch.no_grad(), single_thread(device):
        masks = cls.whole_model_masks(layers, target, config) if not structure.is_nm else None
        for name, layer in layers.items():
            if masks is not None:
                apply_mask(layer, masks[name])
            else:
                method = cls(config, weight_view(layer).shape[1], key=name)
                apply_mask(layer, method.prune(layer, targets[name], structure))


def _prune_blocks_without_data(model: nn.Module, cls: type[LayerwiseMethod], config: SparsityConfig,
                               layers_by_block: list[dict[str, nn.Module]], targets: dict[str, float],
                               structure: Structure, placement: BlockPlacement, device: torch.device,
                               progress: bool) -> dict[str, dict[str, Any]]:
    """Methods that read only the weights, block by block, each block's weights brought in by ``placement``."""
    from tqdm.auto import tqdm

    reports: dict[str, dict[str, Any]] = {}
    blocks = [block for _, block in get_adapter(model).all_blocks()]
    for block, layers in tqdm(list(zip(blocks, layers_by_block, strict=True)), desc=type(config).method,
                              disable=not progress, leave=False):
        if not layers:
            continue
        placement.enter(block, device)
        try:
            with torch.no_grad(), single_thread(device):
                for name, layer in layers.items():
                    method = cls(config, weight_view(layer).shape[1], key=name)
                    apply_mask(layer, method.prune(layer, targets[name], structure))
            reports.update(layer_report(layers))
        except BaseException:
            placement.leave(block, changed=False)
            raise
        placement.leave(block, changed=True)
    return reports


def _engine_timing(engine: EngineReport) -> dict[str, float]:
    return {"capture_s": engine.capture_s, "stats_s": engine.stats_s, "change_s": engine.change_s,
            "replay_s": engine.replay_s}


def _result(config: MethodConfig, target: float | None, layers: dict[str, nn.Module],
            targets: Mapping[str, float | None], block_sparsity: list[float] | None, ratios: list[float] | None,
            timing: dict[str, float], extra: dict[str, Any], kind: str = "one-shot",
            reports: Mapping[str, dict[str, Any]] | None = None) -> PruneResult:
    reports = reports or {}
    report = {**layer_report({n: m for n, m in layers.items() if n not in reports}), **reports}
    report = {name: report[name] for name in layers}
    for name, info in report.items():
        info["target"] = targets.get(name)
    return PruneResult(config, target, total_sparsity(report), report, block_sparsity, ratios, timing, extra, kind)
