"""Model adapters: where a family keeps its transformer blocks and, inside a block, its layers.

An adapter knows names, never maths: the pruning engine and every method ask it where the
blocks, attention projections and MLP projections are, and work on whatever it returns.
A new family is one small file that subclasses :class:`ModelAdapter` and sets class attributes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from prunekit.adapters.layers import is_linear, reorder_inputs, reorder_outputs
from prunekit.errors import PrunekitError


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    """root.get_submodule(path) with '' meaning root itself."""
    return root if not path else root.get_submodule(path)


class ModelAdapter:
    """Names of the parts of one model family.

    Paths are relative: ``blocks_path`` to ``model.base_model``; the others to one block.
    ``stack_paths``: several block lists run one after the other (an encoder and a decoder); empty for
    one list at ``blocks_path``. ``qkv_fused`` is set instead of q/k/v for families that compute q, k
    and v in one layer; :meth:`qkv_rows` says which of its rows belong to which head.
    ``mlp_in_chunks``: each MLP input layer holds this many equal parts, one per FFN neuron each (Phi-3's
    gate_up_proj: 2). ``head_norms``: norms applied to the whole query (first) and key (second) vector;
    those whose size spans all heads (OLMo 2) lose the rows of removed heads, per-head ones (Qwen3) stay.
    ``config_head_dim``: the config has an explicit ``head_dim`` that the attention reads, so heads
    can be removed and the config still describes the model. ``heads_from_config``: the attention
    reads its head count from the shared config at run time, so every block must keep the same number.
    ``bias_flags``: the config switches that give (attention layers, MLP layers) biases, or None when
    the family has no such switches.
    """

    family: ClassVar[str] = "base"
    model_types: ClassVar[tuple[str, ...]] = ()
    blocks_path: ClassVar[str] = ""
    stack_paths: ClassVar[tuple[str, ...]] = ()
    attention_path: ClassVar[str] = ""
    q_proj: ClassVar[str | None] = None
    k_proj: ClassVar[str | None] = None
    v_proj: ClassVar[str | None] = None
    qkv_fused: ClassVar[str | None] = None
    o_proj: ClassVar[str] = ""
    mlp_in: ClassVar[tuple[str, ...]] = ()
    mlp_out: ClassVar[str] = ""
    mlp_in_chunks: ClassVar[int] = 1
    head_norms: ClassVar[tuple[str, ...]] = ()
    config_head_dim: ClassVar[bool] = False
    heads_from_config: ClassVar[bool] = False
    bias_flags: ClassVar[tuple[str, str] | None] = None
    # config attribute names (first one that exists is used)
    heads_attrs: ClassVar[tuple[str, ...]] = ("num_attention_heads", "n_head", "n_heads")
    kv_heads_attrs: ClassVar[tuple[str, ...]] = ("num_key_value_heads",)
    hidden_attrs: ClassVar[tuple[str, ...]] = ("hidden_size", "n_embd", "dim")
    intermediate_attrs: ClassVar[tuple[str, ...]] = ("intermediate_size", "ffn_dim", "n_inner", "hidden_dim")
    layers_attrs: ClassVar[tuple[str, ...]] = ("num_hidden_layers", "n_layer", "n_layers")

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        # a bare nn.Module has no config: the generic adapter still finds its blocks, sizes stay unknown
        self.config = getattr(model, "config", None)

    # ---- blocks -------------------------------------------------------------------------
    @property
    def base_model(self) -> nn.Module:
        """The model without its task head (e.g. LlamaModel inside LlamaForCausalLM)."""
        return getattr(self.model, "base_model", self.model)

    def blocks(self) -> nn.ModuleList:
        """The transformer blocks, in order."""
        blocks = get_submodule(self.base_model, self.blocks_path)
        if not isinstance(blocks, nn.ModuleList):
            raise PrunekitError(f"{self.family} adapter: '{self.blocks_path}' is not a list of blocks")
        return blocks

    def blocks_prefix(self) -> str:
        """Full module name of the block list, as in model.named_modules()."""
        return self._module_name(self.blocks())

    def _module_name(self, target: nn.Module) -> str:
        for name, module in self.model.named_modules():
            if module is target:
                return name
        raise PrunekitError(f"{self.family} adapter: block list not found in the model")

    def stacks(self) -> list[nn.ModuleList]:
        """Every list of blocks, in the order the model runs them (encoder, then decoder)."""
        if not self.stack_paths:
            return [self.blocks()]
        stacks: list[nn.ModuleList] = []
        for path in self.stack_paths:
            stack = get_submodule(self.base_model, path)
            if not isinstance(stack, nn.ModuleList):
                raise PrunekitError(f"{self.family} adapter: '{path}' is not a list of blocks")
            stacks.append(stack)
        return stacks

    def all_blocks(self) -> list[tuple[str, nn.Module]]:
        """(full module name, block) of every block of every stack, in running order."""
        return [(f"{self._module_name(stack)}.{index}", block) for stack in self.stacks()
                for index, block in enumerate(stack)]

    def forward_inputs(self, input_ids: torch.Tensor) -> dict[str, Any]:
        """The arguments that run the whole model on ``input_ids``.

        An encoder-decoder reads the text with its encoder and, teacher-forced, with its decoder: the
        decoder's inputs are the same ids shifted right behind the config's decoder start token.
        """
        if not getattr(self.config, "is_encoder_decoder", False):
            return {"input_ids": input_ids}
        start = getattr(self.config, "decoder_start_token_id", None)
        if start is None:
            raise PrunekitError(f"model type '{self._model_type()}' is an encoder-decoder whose config names no "
                                "decoder_start_token_id: set it in config.json")
        decoder = torch.cat([torch.full_like(input_ids[:, :1], int(start)), input_ids[:, :-1]], dim=1)
        return {"input_ids": input_ids, "decoder_input_ids": decoder}

    def require_structured(self) -> None:
        """Refuse (one-line PrunekitError) a layout whose attention and MLP layers are not named."""
        if len(self.stacks()) > 1:
            raise PrunekitError(f"structured pruning of encoder-decoder models (model type '{self._model_type()}') "
                                "is not supported: prune them one-shot, unstructured or N:M (e.g. --method wanda)")
        if not self.o_proj or not self.mlp_out or not self.attention_inputs() or not self.mlp_in:
            raise PrunekitError(f"structured pruning needs an adapter that names the attention and MLP layers; "
                                f"model type '{self._model_type()}' has none: add one in prunekit/adapters")

    def check_head_removal(self) -> None:
        """Refuse (one-line PrunekitError) removing attention heads when this model's layout cannot lose any."""

    def bias_flag(self, part: str) -> str | None:
        """The config switch that gives the ``part`` ("attention" or "mlp") layers biases, if this config has it."""
        if self.bias_flags is None:
            return None
        flag = self.bias_flags[0] if part == "attention" else self.bias_flags[1]
        return flag if hasattr(self.config, flag) else None

    def check_block_removal(self, kept: Sequence[int]) -> None:
        """Refuse removing blocks when keeping only ``kept`` (old indices, in order) would change what they compute."""

    def _model_type(self) -> str:
        return str(getattr(self.config, "model_type", None) or type(self.model).__name__)

    # ---- layers inside a block ----------------------------------------------------------
    def attention(self, block: nn.Module) -> nn.Module:
        return get_submodule(block, self.attention_path)

    def attention_inputs(self) -> tuple[str, ...]:
        """Names (relative to a block) of the layers that read the attention input."""
        if self.qkv_fused:
            return (self.qkv_fused,)
        return tuple(p for p in (self.q_proj, self.k_proj, self.v_proj) if p)

    def block_linear_names(self) -> tuple[str, ...]:
        """Names of the prunable linear layers inside a block, in execution order."""
        return (*self.attention_inputs(), self.o_proj, *self.mlp_in, self.mlp_out)

    def block_linears(self, block: nn.Module) -> dict[str, nn.Module]:
        """Prunable linear layers of one block, by name relative to the block."""
        out: dict[str, nn.Module] = {}
        for name in self.block_linear_names():
            module = get_submodule(block, name)
            if not is_linear(module):
                raise PrunekitError(f"{self.family} adapter: '{name}' is a {type(module).__name__}, not a linear layer")
            out[name] = module
        return out

    def prunable_layers(self) -> dict[str, nn.Module]:
        """All prunable linear layers of the model (every stack's blocks), by full module name."""
        out: dict[str, nn.Module] = {}
        for block_name, block in self.all_blocks():
            for name, module in self.block_linears(block).items():
                out[f"{block_name}.{name}"] = module
        return out

    def qkv_rows(self, heads: int, kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows of the fused q/k/v layer of each query head (heads, head_dim), key and value head (kv_heads, head_dim).

        This layout: all query heads, then all key heads, then all value heads (GPT-2, Phi-3). Rows kept in
        their original order give the same layout with fewer heads.
        """
        q = torch.arange(heads * head_dim).reshape(heads, head_dim)
        k = heads * head_dim + torch.arange(kv_heads * head_dim).reshape(kv_heads, head_dim)
        return q, k, k + kv_heads * head_dim

    # ---- FFN channel permutation ---------------------------------------------------------
    def ffn_permutation_refusal(self) -> str | None:
        """Why this layout cannot reorder its FFN's intermediate channels, or None when it can.

        The intermediate channels are produced by the ``mlp_in`` layers (one output row per channel, in
        ``mlp_in_chunks`` parts), go through an elementwise activation (and product, when gated) and are
        read by ``mlp_out``'s inputs: reordering all of them alike leaves the block's function unchanged.
        """
        if len(self.stacks()) > 1:
            return (f"model type '{self._model_type()}' (encoder-decoder) has no adapter naming its FFN layers, "
                    "so its channels cannot be permuted: drop permute")
        if not self.mlp_in or not self.mlp_out:
            return (f"model type '{self._model_type()}' has no adapter naming its FFN layers, so its channels "
                    "cannot be permuted: drop permute (or add an adapter in prunekit/adapters)")
        return None

    def ffn_output_name(self) -> str:
        """The layer (relative to a block) whose input channels :meth:`permute_ffn_channels` reorders."""
        refusal = self.ffn_permutation_refusal()
        if refusal:
            raise PrunekitError(refusal)
        return self.mlp_out

    def permute_ffn_channels(self, block: nn.Module, order: torch.Tensor) -> list[str]:
        """Reorder the block's FFN intermediate channels (new channel i = old ``order[i]``); the names changed.

        The producers' output rows (gate and up alike) and the consumer's input columns move together.
        """
        consumer = self.ffn_output_name()
        for name in self.mlp_in:
            reorder_outputs(get_submodule(block, name), order, self.mlp_in_chunks)
        reorder_inputs(get_submodule(block, consumer), order)
        return [*self.mlp_in, consumer]

    # ---- sizes --------------------------------------------------------------------------
    def _config_value(self, attrs: tuple[str, ...]) -> int | None:
        for attr in attrs:
            value = getattr(self.config, attr, None)
            if value is not None:
                return int(value)
        return None

    def num_heads(self) -> int:
        value = self._config_value(self.heads_attrs)
        if value is None:
            raise PrunekitError(f"{self.family} adapter: the config names no number of attention heads")
        return value

    def num_kv_heads(self) -> int:
        """Key/value heads: fewer than num_heads under grouped-query attention."""
        return self._config_value(self.kv_heads_attrs) or self.num_heads()

    def hidden_size(self) -> int:
        value = self._config_value(self.hidden_attrs)
        if value is None:
            raise PrunekitError(f"{self.family} adapter: the config names no hidden size")
        return value

    def head_dim(self) -> int:
        explicit = getattr(self.config, "head_dim", None)
        return int(explicit) if explicit else self.hidden_size() // self.num_heads()

    def intermediate_size(self) -> int | None:
        value = self._config_value(self.intermediate_attrs)
        return value if value is not None else 4 * self.hidden_size()

    def num_layers(self) -> int:
        return len(self.blocks())

    def describe(self) -> dict[str, object]:
        """A JSON-friendly summary of the layout, for records and `prunekit models`."""
        return {
            "family": self.family,
            "blocks": self.blocks_prefix(),
            "num_blocks": self.num_layers(),
            "num_heads": self.num_heads(),
            "num_kv_heads": self.num_kv_heads(),
            "head_dim": self.head_dim(),
            "hidden_size": self.hidden_size(),
            "intermediate_size": self.intermediate_size(),
            "block_linears": list(self.block_linear_names()),
        }
