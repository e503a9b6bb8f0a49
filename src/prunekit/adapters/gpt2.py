"""GPT-2: Conv1D layers (weights stored (in, out)) and a fused q/k/v projection."""

from prunekit.adapters.base import ModelAdapter


class GPT2Adapter(ModelAdapter):
    family = "gpt2"
    model_types = ("gpt2",)
    blocks_path = "h"
    attention_path = "attn"
    qkv_fused = "attn.c_attn"
    o_proj = "attn.c_proj"
    mlp_in = ("mlp.c_fc",)
    mlp_out = "mlp.c_proj"
