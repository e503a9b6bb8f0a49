"""Which head a model carries: a language-model head, a sequence-classification head, or none.

Asked of transformers' own registries (the auto-class mappings keyed by config class), never
guessed from class names: the model is a causal LM when it is an instance of the class that
``AutoModelForCausalLM`` builds for its config, a classifier likewise. A family transformers does
not register (remote code) counts as a causal LM when it can generate with an output embedding.
"""

from __future__ import annotations

from typing import Any, Literal

from torch import nn

ModelHead = Literal["causal-lm", "classification", "base"]


def _registered(mapping: Any, config: object) -> tuple[type, ...]:
    """The model classes ``mapping`` gives for the config's class (or one of its bases); () if none."""
    for config_class in type(config).__mro__:
        try:
            found = mapping[config_class]
        except (KeyError, AttributeError, ImportError, ValueError):
            continue
        return tuple(found) if isinstance(found, list | tuple) else (found,)
    return ()


def model_head(model: nn.Module) -> ModelHead:
    """``"causal-lm"``, ``"classification"`` (sequence classification) or ``"base"`` (no such head)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING,
    )

    config = getattr(model, "config", None)
    if config is None:
        return "base"
    if isinstance(model, _registered(MODEL_FOR_CAUSAL_LM_MAPPING, config)):
        return "causal-lm"
    if isinstance(model, _registered(MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING, config)):
        return "classification"
    if not _registered(MODEL_FOR_CAUSAL_LM_MAPPING, config):  # a family transformers does not know
        can_generate = getattr(model, "can_generate", None)
        get_head = getattr(model, "get_output_embeddings", None)
        if (callable(can_generate) and can_generate() and callable(get_head) and get_head() is not None
                and not getattr(config, "is_encoder_decoder", False)):
            return "causal-lm"
    return "base"
