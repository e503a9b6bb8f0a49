"""Public API of one-shot pruning: ``prune(model, PruneConfig(...), calibration)``.

    from prunekit.pruning import PruneConfig, prune
    result = prune(model, PruneConfig(method="wanda", sparsity=0.5), calibration)  # model pruned in place

Layer-wise methods (magnitude, random, wanda, sparsegpt) prune the linear layers inside the transformer
blocks (embeddings and LM head never, unless ``include_lm_head``), filtered by ``include``/``exclude``
fnmatch patterns on full module names. Whole-model methods registered by other modules get the config
as is (``ratio``, ``remove``, ``importance`` are theirs).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prunekit.adapters import get_adapter, is_linear, weight_view
from prunekit.calibration import BlockVisitor, EngineReport, Observer, run_blockwise, single_thread
from prunekit.errors import PrunekitError
from prunekit.masks import Structure, apply_mask, check_nm, layer_report, parse_structure
from prunekit.methods import MethodInfo, get_method
from prunekit.methods.base import LayerwiseMethod

ALLOCATIONS = ("uniform", "owl")


@dataclass
class PruneConfig:
    """Settings of one pruning run; ``asdict(config)`` goes into the pruning record."""

    method: str = "wanda"
    sparsity: float | None = None  # fraction of weights removed; implied by an N:M structure
    structure: str = "unstructured"  # "unstructured" or "N:M" (e.g. "2:4")
    allocation: str = "uniform"  # per-block sparsity: uniform or owl
    compare: str | None = None  # magnitude: layer (default) | row | global; wanda: row (default) | layer
    include: list[str] | None = None  # fnmatch patterns on full module names; None = every block linear
    exclude: list[str] | None = None
    include_lm_head: bool = False  # magnitude/random only
    block_size: int = 128  # sparsegpt column block
    dampening: float = 0.01  # sparsegpt: fraction of mean(diag H) added to the diagonal
    owl_m: float = 5.0  # owl: a score is an outlier above owl_m x the block's mean score
    owl_lambda: float = 0.08  # owl: block sparsities spread over 2 x owl_lambda
    seed: int = 0
    micro_batch_size: int = 8  # calibration samples per forward in the engine
    ratio: float | None = None  # structured methods: fraction of heads/neurons/blocks to remove
    remove: int | None = None  # structured methods: number of blocks/heads to remove
    importance: str | None = None  # structured methods: importance score name
    heads_ratio: float | None = None  # heads-neurons: fraction of heads to remove (default: ratio)
    neurons_ratio: float | None = None  # heads-neurons: fraction of FFN neurons to remove (default: ratio)
    gqa: str | None = None  # heads-neurons with grouped-query attention: query (default) or groups
    bias_compensation: bool | None = None  # heads-neurons: output-bias compensation (default: on for flap)

    def __post_init__(self) -> None:
        self.include = _patterns(self.include, "include")
        self.exclude = _patterns(self.exclude, "exclude")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PruneConfig:
        """Build from a dict (YAML, CLI settings); unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise PrunekitError(f"unknown pruning settings {', '.join(unknown)}: known are {', '.join(sorted(known))}")
        return cls(**values)

    def structure_spec(self) -> Structure:
        """The parsed ``structure`` (unstructured or N:M)."""
        return parse_structure(self.structure)

    def target_sparsity(self) -> float:
        """The sparsity asked for: given, or implied by N:M (both given must agree)."""
        structure = self.structure_spec()
        if structure.is_nm:
            implied = structure.sparsity or 0.0
            if self.sparsity is not None and abs(self.sparsity - implied) > 1e-9:
                raise PrunekitError(f"sparsity {self.sparsity:g} contradicts structure {structure} (which prunes "
                                    f"{implied:g}): drop --sparsity or use unstructured")
            return implied
        if self.sparsity is None:
            raise PrunekitError(f"method {self.method} needs a sparsity: pass --sparsity (e.g. 0.5) or --structure 2:4")
        return float(self.sparsity)

    def validate(self) -> MethodInfo:
        """Check the settings that need no model; returns the method's registry entry."""
        info = get_method(self.method)
        if self.sparsity is not None and not 0.0 <= float(self.sparsity) < 1.0:
            raise PrunekitError(f"sparsity {self.sparsity} is outside [0, 1): use a fraction such as 0.5")
        if info.layerwise is None:  # whole-model methods check their own settings
            return info
        structure = self.structure_spec()
        if self.allocation not in ALLOCATIONS:
            raise PrunekitError(f"unknown allocation '{self.allocation}': use one of {', '.join(ALLOCATIONS)}")
        self.target_sparsity()
        cls = info.layerwise
        if self.compare is not None and self.compare not in cls.compares:
            raise PrunekitError(f"method {self.method} cannot compare by '{self.compare}': use one of "
                                f"{', '.join(cls.compares)}")
        if self.allocation == "owl" and structure.is_nm:
            raise PrunekitError("owl allocation varies the sparsity per block, which N:M fixes: use unstructured")
        if self.allocation == "owl" and self.compare == "global":
            raise PrunekitError("owl allocation and a global comparison both set per-layer sparsity: choose one")
        if self.include_lm_head and info.needs_calibration:
            raise PrunekitError(f"include_lm_head works with magnitude and random only, not {self.method}")
        if self.block_size < 1 or self.micro_batch_size < 1:
            raise PrunekitError("block_size and micro_batch_size must be at least 1")
        if not self.dampening > 0:
            raise PrunekitError(f"dampening {self.dampening} must be positive (e.g. 0.01)")
        if not (self.owl_m > 0 and self.owl_lambda >= 0):
            raise PrunekitError("owl_m must be positive and owl_lambda non-negative (defaults 5 and 0.08)")
        return info

    def needs_calibration(self) -> bool:
        """True when the method, or OWL allocation, reads calibration activations."""
        info = get_method(self.method)
        needed = info.calibration_rule(self) if info.calibration_rule is not None else info.needs_calibration
        return needed or self.allocation == "owl"


def _patterns(value: Any, name: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [p for p in value.split(",")]
    if not isinstance(value, list | tuple) or not all(isinstance(p, str) for p in value):
        raise PrunekitError(f"{name} must be a list of name patterns (e.g. '*.mlp.*'), got {value!r}")
    cleaned = [p.strip() for p in value if p.strip()]
    return cleaned or None


@dataclass
class PruneResult:
    """What a pruning run did: achieved sparsity per layer, settings and timing (seconds)."""

    config: PruneConfig
    target_sparsity: float | None
    sparsity: float  # achieved over the selected layers (zeros / weights)
    layers: dict[str, dict[str, Any]]  # full name -> shape, params, nonzero, sparsity, target
    block_sparsity: list[float] | None = None
    outlier_ratios: list[float] | None = None
    timing: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """The JSON-friendly part of a prunekit record: method settings, sparsity and timing."""
        sparsity: dict[str, Any] = {"target": self.target_sparsity, "total": self.sparsity,
                                    "layers": {name: info["sparsity"] for name, info in self.layers.items()}}
        if self.block_sparsity is not None:
            sparsity["blocks"] = self.block_sparsity
        if self.outlier_ratios is not None:
            sparsity["outlier_ratios"] = self.outlier_ratios
        out = {"method": dataclasses.asdict(self.config), "sparsity": sparsity, "timing": dict(self.timing)}
        if self.extra:
            out["method_result"] = self.extra
        return out


def select_layers(model: nn.Module, config: PruneConfig) -> list[dict[str, nn.Module]]:
    """The layers to prune, per block (full module name -> layer), after include/exclude patterns."""
    adapter = get_adapter(model)
    prefix = adapter.blocks_prefix()
    per_block: list[dict[str, nn.Module]] = []
    for index, block in enumerate(adapter.blocks()):
        chosen = {f"{prefix}.{index}.{name}": layer for name, layer in adapter.block_linears(block).items()}
        per_block.append({name: layer for name, layer in chosen.items() if _wanted(name, config)})
    return per_block


def _wanted(name: str, config: PruneConfig) -> bool:
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
    """Engine visitor: one method instance per input stream; prune every selected layer of the block."""

    def __init__(self, cls: type[LayerwiseMethod], config: PruneConfig, layers_by_block: list[dict[str, nn.Module]],
                 block_sparsity: list[float], structure: Structure) -> None:
        self.cls = cls
        self.config = config
        self.layers_by_block = layers_by_block
        self.block_sparsity = block_sparsity
        self.structure = structure

    def layers(self, index: int, block: nn.Module) -> dict[str, nn.Module]:
        return self.layers_by_block[index]

    def observer(self, name: str, layer: nn.Module, in_features: int) -> Observer:
        return self.cls(self.config, in_features, key=name)

    def finish(self, index: int, block: nn.Module, layers: dict[str, nn.Module],
               observers: dict[str, Observer]) -> None:
        for name, layer in layers.items():
            method = observers[name]
            assert isinstance(method, LayerwiseMethod)
            apply_mask(layer, method.prune(layer, self.block_sparsity[index], self.structure))


def _resolve_run_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    from prunekit.utils import resolve_device

    if device is None:
        param = next(model.parameters(), None)
        return param.device if param is not None else torch.device("cpu")
    return resolve_device(device)


def prune(model: nn.Module, config: PruneConfig | dict[str, Any], calibration: torch.Tensor | None = None, *,
          device: str | torch.device | None = None, progress: bool = True) -> PruneResult:
    """Prune ``model`` in place by ``config``; ``calibration`` is a LongTensor [samples, seq_len] of token ids.

    ``device`` is where each block and the activations are computed (default: the model's device);
    the rest of the model stays where it is.
    """
    config = config if isinstance(config, PruneConfig) else PruneConfig.from_dict(dict(config))
    info = config.validate()
    if config.needs_calibration():
        calibration = check_calibration(model, calibration, config.method)
    run_device = _resolve_run_device(model, device)
    started = time.perf_counter()
    if info.fn is not None:
        extra = info.fn(model, config, calibration, run_device, progress) or {}
        layers = get_adapter(model).prunable_layers()
        return _result(config, None, layers, {name: None for name in layers}, None, None,
                       {"total_s": time.perf_counter() - started}, extra)

    assert info.layerwise is not None
    cls = info.layerwise
    structure = config.structure_spec()
    target = config.target_sparsity()
    layers_by_block = select_layers(model, config)
    extra_layers = _lm_head(model) if config.include_lm_head else {}
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
                                                progress=progress)
        timing["owl_s"] = time.perf_counter() - start
    targets = {name: block_sparsity[i] for i, block in enumerate(layers_by_block) for name in block}
    targets.update({name: target for name in extra_layers})

    start = time.perf_counter()
    if cls.needs_calibration:
        assert calibration is not None
        visitor = _PruneVisitor(cls, config, layers_by_block, block_sparsity, structure)
        engine = run_blockwise(model, calibration, visitor, device=run_device,
                               micro_batch_size=config.micro_batch_size, progress=progress, desc=config.method)
        timing.update(_engine_timing(engine))
    else:
        _prune_without_data(cls, config, every, targets, structure, target)
    timing["prune_s"] = time.perf_counter() - start
    timing["total_s"] = time.perf_counter() - started
    return _result(config, target, every, targets, block_sparsity if config.allocation == "owl" else None,
                   ratios, timing, {})


def _prune_without_data(cls: type[LayerwiseMethod], config: PruneConfig, layers: dict[str, nn.Module],
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


def _engine_timing(engine: EngineReport) -> dict[str, float]:
    return {"capture_s": engine.capture_s, "stats_s": engine.stats_s, "change_s": engine.change_s,
            "replay_s": engine.replay_s}


def _result(config: PruneConfig, target: float | None, layers: dict[str, nn.Module],
            targets: Mapping[str, float | None], block_sparsity: list[float] | None, ratios: list[float] | None,
            timing: dict[str, float], extra: dict[str, Any]) -> PruneResult:
    report = layer_report(layers)
    for name, info in report.items():
        info["target"] = targets.get(name)
    params = sum(int(info["params"]) for info in report.values())  # type: ignore[call-overload]
    nonzero = sum(int(info["nonzero"]) for info in report.values())  # type: ignore[call-overload]
    achieved = 1.0 - nonzero / params if params else 0.0
    return PruneResult(config, target, achieved, report, block_sparsity, ratios, timing, extra)
