"""OPT: decoder layers with separate q/k/v/out projections and fc1/fc2."""

from prunekit.adapters.base import ModelAdapter


class OPTAdapter(ModelAdapter):
    family = "opt"
    model_types = ("opt",)
    blocks_path = "decoder.layers"
    attention_path = "self_attn"
    q_proj = "self_attn.q_proj"
    k_proj = "self_attn.k_proj"
    v_proj = "self_attn.v_proj"
    o_proj = "self_attn.out_proj"
    mlp_in = ("fc1",)
    mlp_out = "fc2"
