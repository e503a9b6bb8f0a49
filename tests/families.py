"""Tiny random models of every common family, for the family matrix and the block-input golden tests.

Every model has hidden size 32 and 2 blocks (an encoder-decoder: 2 + 2), a vocabulary of 100 and is
seeded, so a test builds, prunes and reloads one in well under a second. Families that mix attention
types get both kinds within their 2 blocks and a sliding window (4) shorter than the test sequences.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

VOCAB = 100
WINDOW = 4  # sliding window of the families that have one: shorter than SEQ_LEN
SEQ_LEN = 12
COMMON: dict[str, Any] = {"vocab_size": VOCAB, "pad_token_id": 1, "bos_token_id": 2, "eos_token_id": 3}
LLAMA_LIKE: dict[str, Any] = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
                              "tie_word_embeddings": False}
MIXED = ["sliding_attention", "full_attention"]

# family -> (config class name in transformers, task, config arguments)
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "causal-lm", LLAMA_LIKE),
    "mistral": ("MistralConfig", "causal-lm", {**LLAMA_LIKE, "sliding_window": WINDOW}),
    "qwen2": ("Qwen2Config", "causal-lm", {**LLAMA_LIKE, "use_sliding_window": True, "sliding_window": WINDOW,
                                           "layer_types": MIXED}),
    "qwen3": ("Qwen3Config", "causal-lm", {**LLAMA_LIKE, "head_dim": 8, "use_sliding_window": True,
                                           "sliding_window": WINDOW, "layer_types": MIXED}),
    "gemma": ("GemmaConfig", "causal-lm", {**LLAMA_LIKE, "head_dim": 8}),
    "gemma2": ("Gemma2Config", "causal-lm", {**LLAMA_LIKE, "head_dim": 8, "sliding_window": WINDOW,
                                             "layer_types": MIXED}),
    "gemma3": ("Gemma3TextConfig", "causal-lm", {**LLAMA_LIKE, "head_dim": 8, "sliding_window": WINDOW,
                                                 "layer_types": MIXED}),
    "phi3": ("Phi3Config", "causal-lm", LLAMA_LIKE),
    "olmo": ("OlmoConfig", "causal-lm", LLAMA_LIKE),
    "olmo2": ("Olmo2Config", "causal-lm", LLAMA_LIKE),
    "granite": ("GraniteConfig", "causal-lm", LLAMA_LIKE),
    "gpt_neox": ("GPTNeoXConfig", "causal-lm", {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                                "num_attention_heads": 4, "max_position_embeddings": 64}),
    "falcon": ("FalconConfig", "causal-lm", {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                                             "num_kv_heads": 2, "new_decoder_architecture": True, "alibi": False,
                                             "ffn_hidden_size": 64}),
    "falcon-mq": ("FalconConfig", "causal-lm", {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                                                "multi_query": True, "new_decoder_architecture": False,
                                                "parallel_attn": True, "alibi": False, "ffn_hidden_size": 64}),
    "falcon-rw": ("FalconConfig", "causal-lm", {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                                                "num_kv_heads": 4, "multi_query": False,
                                                "new_decoder_architecture": False, "parallel_attn": False,
                                                "alibi": False, "ffn_hidden_size": 64}),
    "gpt2": ("GPT2Config", "causal-lm", {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64, "n_inner": 64}),
    "opt": ("OPTConfig", "causal-lm", {"hidden_size": 32, "ffn_dim": 64, "num_hidden_layers": 2,
                                       "num_attention_heads": 4, "max_position_embeddings": 64,
                                       "word_embed_proj_dim": 32}),
    "bert": ("BertConfig", "classification", {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                              "num_attention_heads": 4, "max_position_embeddings": 64}),
    "roberta": ("RobertaConfig", "classification", {"hidden_size": 32, "intermediate_size": 64,
                                                    "num_hidden_layers": 2, "num_attention_heads": 4,
                                                    "max_position_embeddings": 70}),
    "distilbert": ("DistilBertConfig", "classification", {"dim": 32, "hidden_dim": 64, "n_layers": 2, "n_heads": 4,
                                                          "max_position_embeddings": 64}),
    "t5": ("T5Config", "seq2seq-lm", {"d_model": 32, "d_ff": 64, "d_kv": 8, "num_layers": 2, "num_heads": 4,
                                      "decoder_start_token_id": 1}),
    "bart": ("BartConfig", "seq2seq-lm", {"d_model": 32, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
                                          "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4,
                                          "decoder_attention_heads": 4, "max_position_embeddings": 64}),
}
# families whose blocks get different arguments by layer type (sliding-window and global attention)
MIXED_LAYER_TYPES = ("qwen2", "qwen3", "gemma2", "gemma3")


def tiny_config(family: str, **overrides: Any) -> Any:
    import transformers

    class_name, _task, arguments = FAMILIES[family]
    return getattr(transformers, class_name)(**{**COMMON, **arguments, **overrides})


def task_of(family: str) -> str:
    return FAMILIES[family][1]


def build(family: str, seed: int = 0, **overrides: Any) -> nn.Module:
    """A seeded random model of ``family`` in eval mode; 1-d weights (norms, biases) randomised too."""
    import transformers as tf

    task = task_of(family)
    config = tiny_config(family, **({"num_labels": 2} if task == "classification" else {}), **overrides)
    auto = {"causal-lm": tf.AutoModelForCausalLM, "classification": tf.AutoModelForSequenceClassification,
            "seq2seq-lm": tf.AutoModelForSeq2SeqLM}[task]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = auto.from_config(config)
        with torch.no_grad():
            for param in model.parameters():
                if param.dim() == 1:  # norms start at exactly 1 (or 0), biases at 0: make them informative
                    param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def tokens(samples: int = 3, seq_len: int = SEQ_LEN, seed: int = 1) -> torch.Tensor:
    return torch.randint(4, VOCAB, (samples, seq_len), generator=torch.Generator().manual_seed(seed))


def model_inputs(model: nn.Module, ids: torch.Tensor) -> dict[str, Any]:
    """What runs the whole model (an encoder-decoder also reads the ids, shifted, with its decoder)."""
    from prunekit.adapters import get_adapter

    return get_adapter(model).forward_inputs(ids)


def outputs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(**model_inputs(model, ids), use_cache=False).logits if _takes_cache(model) else \
            model(**model_inputs(model, ids)).logits


def _takes_cache(model: nn.Module) -> bool:
    import inspect

    return "use_cache" in inspect.signature(model.forward).parameters
