"""Adapters by model family; `get_adapter(model)` picks one from `config.model_type`.

Everything a family or a layer kind does differently lives in this package: adapters (names of a
family's parts, its config switches), :mod:`~prunekit.adapters.layers` (how each kind of linear layer
stores its weight) and :mod:`~prunekit.adapters.heads` (which head a model carries).
"""

from __future__ import annotations

from torch import nn

from prunekit.adapters.base import ModelAdapter
from prunekit.adapters.bert import BertAdapter, DistilBertAdapter
from prunekit.adapters.falcon import FalconAdapter
from prunekit.adapters.generic import GenericAdapter
from prunekit.adapters.gpt2 import GPT2Adapter
from prunekit.adapters.gpt_neox import GPTNeoXAdapter
from prunekit.adapters.heads import ModelHead, model_head
from prunekit.adapters.layers import (
    LINEAR_TYPES,
    grad_view,
    is_linear,
    keep_inputs,
    keep_outputs,
    make_linear_like,
    reorder_inputs,
    reorder_outputs,
    weight_view,
)
from prunekit.adapters.llama import LlamaAdapter
from prunekit.adapters.opt import OPTAdapter
from prunekit.adapters.phi3 import Phi3Adapter

ADAPTERS: list[type[ModelAdapter]] = [LlamaAdapter, Phi3Adapter, GPT2Adapter, GPTNeoXAdapter, FalconAdapter, OPTAdapter,
                                      BertAdapter, DistilBertAdapter]


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


def structured_adapter(model: nn.Module) -> ModelAdapter:
    """The model's adapter, refusing (one-line PrunekitError) a layout whose attention and MLP are unknown."""
    adapter = get_adapter(model)
    adapter.require_structured()
    return adapter


__all__ = ["ADAPTERS", "LINEAR_TYPES", "GenericAdapter", "ModelAdapter", "ModelHead", "get_adapter", "grad_view",
           "is_linear", "keep_inputs", "keep_outputs", "make_linear_like", "model_head", "register_adapter",
           "reorder_inputs", "reorder_outputs", "structured_adapter", "weight_view"]
