"""Adapters by model family; `get_adapter(model)` picks one from `config.model_type`."""

from __future__ import annotations

from torch import nn

from prunekit.adapters.base import LINEAR_TYPES, ModelAdapter, is_linear, weight_view
from prunekit.adapters.bert import BertAdapter, DistilBertAdapter
from prunekit.adapters.generic import GenericAdapter
from prunekit.adapters.gpt2 import GPT2Adapter
from prunekit.adapters.llama import LlamaAdapter
from prunekit.adapters.opt import OPTAdapter

ADAPTERS: list[type[ModelAdapter]] = [LlamaAdapter, GPT2Adapter, OPTAdapter, BertAdapter, DistilBertAdapter]


def register_adapter(adapter: type[ModelAdapter]) -> type[ModelAdapter]:
    """Register a new family (usable as a class decorator); later registrations win."""
    ADAPTERS.insert(0, adapter)
    return adapter


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for this model's family, or the generic fallback."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter(model)
    return GenericAdapter(model)


__all__ = ["ADAPTERS", "LINEAR_TYPES", "GenericAdapter", "ModelAdapter", "get_adapter", "is_linear",
           "register_adapter", "weight_view"]
