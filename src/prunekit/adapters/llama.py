"""Llama and its look-alikes (Mistral, Qwen2, Qwen3, Phi-3-free): gated MLP, grouped-query attention."""

from prunekit.adapters.base import ModelAdapter


class LlamaAdapter(ModelAdapter):
    family = "llama"
    model_types = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "granite", "olmo", "olmo2")
    blocks_path = "layers"
    attention_path = "self_attn"
    q_proj = "self_attn.q_proj"
    k_proj = "self_attn.k_proj"
    v_proj = "self_attn.v_proj"
    o_proj = "self_attn.o_proj"
    mlp_in = ("mlp.gate_proj", "mlp.up_proj")
    mlp_out = "mlp.down_proj"
    config_head_dim = True  # the config's head_dim is what the attention reads
    bias_flags = ("attention_bias", "mlp_bias")
