"""Falcon: one fused q/k/v projection in one of three layouts, parallel attention and MLP.

- ``new_decoder_architecture`` (Falcon-40B/180B): per key/value group, its query heads, then its key
  head, then its value head;
- ``multi_query`` (Falcon-7B): all query heads, then the one key head and the one value head;
- otherwise (Falcon-RW): head by head, query, key and value.

ALiBi models (``alibi: true``) give every head its own slope by index, so their heads are not removed.
"""

import torch

from prunekit.adapters.base import ModelAdapter
from prunekit.errors import PrunekitError


class FalconAdapter(ModelAdapter):
    family = "falcon"
    model_types = ("falcon",)
    blocks_path = "h"
    attention_path = "self_attention"
    qkv_fused = "self_attention.query_key_value"
    o_proj = "self_attention.dense"
    mlp_in = ("mlp.dense_h_to_4h",)
    mlp_out = "mlp.dense_4h_to_h"
    kv_heads_attrs = ("num_kv_heads",)
    intermediate_attrs = ("ffn_hidden_size",)

    def _layout(self) -> str:
        if getattr(self.config, "new_decoder_architecture", False):
            return "grouped"
        return "multi-query" if getattr(self.config, "multi_query", False) else "per-head"

    def num_kv_heads(self) -> int:
        layout = self._layout()
        return 1 if layout == "multi-query" else self.num_heads() if layout == "per-head" else super().num_kv_heads()

    def qkv_rows(self, heads: int, kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        layout = self._layout()
        if layout == "multi-query":
            return super().qkv_rows(heads, kv_heads, head_dim)
        dims = torch.arange(head_dim)[None, :]
        if layout == "per-head":
            base = (torch.arange(heads) * 3 * head_dim)[:, None] + dims
            return base, base + head_dim, base + 2 * head_dim
        group = heads // kv_heads
        slots = torch.arange(heads) // group * (group + 2) + torch.arange(heads) % group
        kv = torch.arange(kv_heads) * (group + 2) + group
        return slots[:, None] * head_dim + dims, kv[:, None] * head_dim + dims, (kv + 1)[:, None] * head_dim + dims

    def check_head_removal(self) -> None:
        if getattr(self.config, "alibi", False):
            raise PrunekitError("this Falcon model uses ALiBi, whose per-head slopes follow the head count: its heads "
                                "cannot be removed; remove FFN neurons only (--heads-ratio 0)")
