"""Fallback for families without an adapter: blocks found through `_no_split_modules`, layers by type.

Good enough for unstructured and N:M pruning (which only need the linear layers of each block);
structured pruning needs to know which layer is which and refuses a generic model.
"""

from __future__ import annotations

from torch import nn

from prunekit.adapters.base import ModelAdapter, is_linear
from prunekit.errors import PrunekitError


class GenericAdapter(ModelAdapter):
    family = "generic"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self._blocks = self._find_blocks()

    def _find_blocks(self) -> nn.ModuleList:
        block_types = set(getattr(self.model, "_no_split_modules", None) or [])
        for module in self.base_model.modules():
            if isinstance(module, nn.ModuleList) and len(module) > 0:
                if type(module[0]).__name__ in block_types:
                    return module
        # no declared block type: the largest list of identical modules that hold linear layers
        best: nn.ModuleList | None = None
        for module in self.base_model.modules():
            if isinstance(module, nn.ModuleList) and len(module) > 1:
                same = len({type(m) for m in module}) == 1
                has_linear = any(is_linear(m) for m in module[0].modules())
                if same and has_linear and (best is None or len(module) > len(best)):
                    best = module
        if best is None:
            model_type = getattr(self.config, "model_type", type(self.model).__name__)
            raise PrunekitError(
                f"no adapter for model type '{model_type}' and no transformer blocks found: "
                "add an adapter file in prunekit/adapters (see adapters/llama.py)")
        return best

    def blocks(self) -> nn.ModuleList:
        return self._blocks

    def block_linear_names(self) -> tuple[str, ...]:
        block = self._blocks[0]
        return tuple(name for name, module in block.named_modules() if name and is_linear(module))

    def block_linears(self, block: nn.Module) -> dict[str, nn.Module]:
        return {name: module for name, module in block.named_modules() if name and is_linear(module)}

    def attention_inputs(self) -> tuple[str, ...]:
        self.require_structured()
        return ()

    def require_structured(self) -> None:
        raise PrunekitError(
            f"model type '{self._model_type()}' has no adapter, so its attention and MLP layers are unknown: "
            "structured pruning needs an adapter (add one in prunekit/adapters, see adapters/llama.py)")
