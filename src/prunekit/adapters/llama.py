"""Llama and its look-alikes: gated MLP, grouped-query attention, separate q/k/v projections.

Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3 (text), Granite, OLMo and OLMo 2 share the names.
Query/key norms: Qwen3 and Gemma 3 normalise each head over head_dim (one weight shared by all heads,
kept as is); OLMo 2 normalises the whole query and key vectors, so removing heads removes their rows of
q_norm/k_norm, and the kept heads are then normalised over the kept heads only.
"""

from prunekit.adapters.base import ModelAdapter


class LlamaAdapter(ModelAdapter):
    family = "llama"
    model_types = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "granite", "olmo",
                   "olmo2")
    blocks_path = "layers"
    attention_path = "self_attn"
    q_proj = "self_attn.q_proj"
    k_proj = "self_attn.k_proj"
    v_proj = "self_attn.v_proj"
    o_proj = "self_attn.o_proj"
    mlp_in = ("mlp.gate_proj", "mlp.up_proj")
    mlp_out = "mlp.down_proj"
    head_norms = ("self_attn.q_norm", "self_attn.k_norm")
    config_head_dim = True  # the config's head_dim is what the attention reads
    bias_flags = ("attention_bias", "mlp_bias")
