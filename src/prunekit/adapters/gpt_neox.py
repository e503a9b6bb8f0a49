"""GPT-NeoX (Pythia): parallel attention and MLP, one fused q/k/v projection laid out head by head."""

import torch

from prunekit.adapters.base import ModelAdapter


class GPTNeoXAdapter(ModelAdapter):
    family = "gpt_neox"
    model_types = ("gpt_neox",)
    blocks_path = "layers"
    attention_path = "attention"
    qkv_fused = "attention.query_key_value"
    o_proj = "attention.dense"
    mlp_in = ("mlp.dense_h_to_4h",)
    mlp_out = "mlp.dense_4h_to_h"

    def qkv_rows(self, heads: int, kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Head h owns rows [h·3d, (h+1)·3d): its query, key and value, d rows each."""
        base = (torch.arange(heads) * 3 * head_dim)[:, None] + torch.arange(head_dim)[None, :]
        return base, base + head_dim, base + 2 * head_dim
