"""Phi-3: one fused q/k/v projection (all query heads, then key heads, then value heads; grouped-query)
and one fused gate/up projection (gate rows, then up rows)."""

from prunekit.adapters.base import ModelAdapter


class Phi3Adapter(ModelAdapter):
    family = "phi3"
    model_types = ("phi3",)
    blocks_path = "layers"
    attention_path = "self_attn"
    qkv_fused = "self_attn.qkv_proj"
    o_proj = "self_attn.o_proj"
    mlp_in = ("mlp.gate_up_proj",)
    mlp_in_chunks = 2
    mlp_out = "mlp.down_proj"
    config_head_dim = True
    heads_from_config = True  # the attention splits q/k/v with config.num_attention_heads at run time
