"""GPT-2: Conv1D layers (weights stored (in, out)) and a fused q/k/v projection."""

from collections.abc import Sequence

from prunekit.adapters.base import ModelAdapter
from prunekit.errors import PrunekitError


class GPT2Adapter(ModelAdapter):
    family = "gpt2"
    model_types = ("gpt2",)
    blocks_path = "h"
    attention_path = "attn"
    qkv_fused = "attn.c_attn"
    o_proj = "attn.c_proj"
    mlp_in = ("mlp.c_fc",)
    mlp_out = "mlp.c_proj"

    def check_block_removal(self, kept: Sequence[int]) -> None:
        if getattr(self.config, "scale_attn_by_inverse_layer_idx", False) and list(kept) != list(range(len(kept))):
            raise PrunekitError("this GPT-2 config scales attention by the block index "
                                "(scale_attn_by_inverse_layer_idx), so renumbered blocks would compute "
                                "differently: remove only the last blocks")
