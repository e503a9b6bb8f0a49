"""Fallback for families without an adapter: blocks found through `_no_split_modules`, layers by type.

Good enough for unstructured and N:M pruning (which only need the linear layers of each block);
structured pruning needs to know which layer is which and refuses a generic model. An
encoder-decoder (T5, BART, ...) has two block lists, found inside its encoder and its decoder; both are
pruned, or the model is refused when either cannot be found.
"""

from __future__ import annotations

from torch import nn

from prunekit.adapters.base import ModelAdapter, is_linear
from prunekit.errors import PrunekitError


class GenericAdapter(ModelAdapter):
    family = "generic"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        if getattr(self.config, "is_encoder_decoder", False):
            self._stacks = [self._find_blocks(self._part("get_encoder")), self._find_blocks(self._part("get_decoder"))]
        else:
            self._stacks = [self._find_blocks(self.base_model)]
        self._blocks = self._stacks[0]

    def _part(self, getter: str) -> nn.Module:
        part = getattr(self.model, getter, None)
        module = part() if callable(part) else None
        if not isinstance(module, nn.Module):
            raise PrunekitError(f"model type '{self._model_type()}' is an encoder-decoder without {getter}(), so its "
                                "two block lists cannot be found: add an adapter in prunekit/adapters")
        return module

    def _find_blocks(self, root: nn.Module) -> nn.ModuleList:
        block_types = set(getattr(self.model, "_no_split_modules", None) or [])
        found: list[nn.ModuleList] = []
        for module in root.modules():
            if isinstance(module, nn.ModuleList) and len(module) > 0 and type(module[0]).__name__ in block_types:
                if not any(module in set(outer.modules()) for outer in found):  # not a list inside a found block
                    found.append(module)
        if len(found) > 1:  # e.g. a vision tower and a language model: pruning one of them would be a silent half
            names = ", ".join(self._module_name(stack) for stack in found)
            raise PrunekitError(f"model type '{self._model_type()}' holds {len(found)} stacks of blocks ({names}) "
                                "and no adapter says which to prune: save the part to prune as a model of its own "
                                "(e.g. the language model) or add an adapter in prunekit/adapters")
        if found:
            return found[0]
        # no declared block type: the largest list of identical modules that hold linear layers
        best: nn.ModuleList | None = None
        for module in root.modules():
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

    def stacks(self) -> list[nn.ModuleList]:
        return list(self._stacks)

    def block_linear_names(self) -> tuple[str, ...]:
        block = self._blocks[0]
        return tuple(name for name, module in block.named_modules() if name and is_linear(module))

    def block_linears(self, block: nn.Module) -> dict[str, nn.Module]:
        return {name: module for name, module in block.named_modules() if name and is_linear(module)}

    def attention_inputs(self) -> tuple[str, ...]:
        self.require_structured()
        return ()

    def require_structured(self) -> None:
        if len(self._stacks) > 1:
            super().require_structured()  # the encoder-decoder refusal
        raise PrunekitError(
            f"model type '{self._model_type()}' has no adapter, so its attention and MLP layers are unknown: "
            "structured pruning needs an adapter (add one in prunekit/adapters, see adapters/llama.py)")
