"""Shared test fixtures: tiny random models of every supported family, a tiny tokenizer, an offline sandbox.

Everything here is offline, seeded and small (hidden size 32, 2 blocks, vocabulary 100), so a test
that prunes, saves or evaluates a model runs in well under a second.

Fixtures
--------
``make_tiny_model(family, task=None, **config_overrides)``
    Factory for a fresh, seeded, eval-mode model. ``family`` is one of :data:`TINY_FAMILIES`
    ("llama", "qwen2", "gpt2", "opt", "bert", "distilbert", "gpt_neox"). ``task`` is prunekit's
    task name: "causal-lm" (default for decoders), "classification" (default for encoders, 2 labels)
    or "base". Keyword arguments override the config (e.g. ``tie_word_embeddings=True``).
    The same arguments always give the same weights.
``tiny_llama``, ``tiny_gpt2``, ``tiny_opt``, ``tiny_bert``
    Ready-made models from the factory: Llama with grouped-query attention (4 heads, 2 key/value
    heads), GPT-2 (Conv1D layers), OPT, and BERT for sequence classification (2 labels).
``tiny_tokenizer``
    A ``PreTrainedTokenizerFast`` (BPE with a Metaspace pre-tokenizer, so decode restores spaces)
    trained on a few sentences; fewer than 100 tokens, so its ids fit every tiny model. Special
    tokens: ``<unk>``=0, ``<pad>``=1, ``<s>``=2 (bos), ``</s>``=3 (eos), matching the tiny configs.
    Caveat: saved beside a *qwen2* config, ``AutoTokenizer.from_pretrained`` reads it back as a
    ``Qwen2Tokenizer`` (transformers 5 rebuilds the pre-tokenizer by model type), which splits text
    differently; compare re-loaded tokenizers with llama, gpt2 or opt models.
``tiny_llama_dir``
    A plain ``save_pretrained`` folder (model + tokenizer, no prunekit record) of ``tiny_llama``.

``prunekit_cache`` (autouse)
    Every test gets its own empty ``PRUNEKIT_CACHE`` (the fixture's value is that folder) and runs
    with the Hugging Face hub and datasets in offline mode, so no test touches the network or the
    user's cache. A test that needs a longer-lived cache sets ``PRUNEKIT_CACHE`` itself with
    ``monkeypatch.setenv`` (see ``real_cache`` in test_models.py).
"""

from __future__ import annotations

import os

# The hub libraries read these once, when first imported: set them before anything imports transformers.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

TINY_VOCAB = 100
TINY_HIDDEN = 32
TINY_LAYERS = 2
TINY_HEADS = 4
TINY_KV_HEADS = 2  # llama / qwen2: grouped-query attention
TINY_INTERMEDIATE = 64
PAD_ID, BOS_ID, EOS_ID = 1, 2, 3

DECODER_FAMILIES = ("llama", "qwen2", "gpt2", "opt", "gpt_neox")
ENCODER_FAMILIES = ("bert", "distilbert")
TINY_FAMILIES = DECODER_FAMILIES + ENCODER_FAMILIES

TOKENIZER_TEXT = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife.",
    "The quick brown fox jumps over the lazy dog.",
    "This movie was wonderful and the acting was great!",
    "This film was terrible; the plot was boring and far too long.",
    "Pruning removes weights from a model; fine-tuning recovers what was lost.",
]


@pytest.fixture(autouse=True)
def prunekit_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh empty prunekit cache per test, and the hub / datasets in offline mode."""
    cache = tmp_path_factory.mktemp("prunekit-cache")
    monkeypatch.setenv("PRUNEKIT_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    try:
        import huggingface_hub.constants as hub_constants

        monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        pass
    yield cache


def _config(family: str, **overrides: Any) -> Any:
    import transformers as tf

    common: dict[str, Any] = {"vocab_size": TINY_VOCAB, "pad_token_id": PAD_ID, "bos_token_id": BOS_ID,
                              "eos_token_id": EOS_ID}
    if family in ("llama", "qwen2"):
        cls = tf.LlamaConfig if family == "llama" else tf.Qwen2Config
        kwargs = {"hidden_size": TINY_HIDDEN, "intermediate_size": TINY_INTERMEDIATE,
                  "num_hidden_layers": TINY_LAYERS, "num_attention_heads": TINY_HEADS,
                  "num_key_value_heads": TINY_KV_HEADS, "max_position_embeddings": 128,
                  "tie_word_embeddings": False}
    elif family == "gpt2":
        cls = tf.GPT2Config
        kwargs = {"n_embd": TINY_HIDDEN, "n_layer": TINY_LAYERS, "n_head": TINY_HEADS, "n_positions": 128,
                  "n_inner": TINY_INTERMEDIATE}
    elif family == "opt":
        cls = tf.OPTConfig
        kwargs = {"hidden_size": TINY_HIDDEN, "ffn_dim": TINY_INTERMEDIATE, "num_hidden_layers": TINY_LAYERS,
                  "num_attention_heads": TINY_HEADS, "max_position_embeddings": 128,
                  "word_embed_proj_dim": TINY_HIDDEN}
    elif family == "gpt_neox":
        cls = tf.GPTNeoXConfig
        kwargs = {"hidden_size": TINY_HIDDEN, "intermediate_size": TINY_INTERMEDIATE,
                  "num_hidden_layers": TINY_LAYERS, "num_attention_heads": TINY_HEADS,
                  "max_position_embeddings": 128}
    elif family == "bert":
        cls = tf.BertConfig
        kwargs = {"hidden_size": TINY_HIDDEN, "intermediate_size": TINY_INTERMEDIATE,
                  "num_hidden_layers": TINY_LAYERS, "num_attention_heads": TINY_HEADS,
                  "max_position_embeddings": 128}
    elif family == "distilbert":
        cls = tf.DistilBertConfig
        kwargs = {"dim": TINY_HIDDEN, "hidden_dim": TINY_INTERMEDIATE, "n_layers": TINY_LAYERS,
                  "n_heads": TINY_HEADS, "max_position_embeddings": 128}
    else:
        raise ValueError(f"unknown tiny family '{family}': use one of {', '.join(TINY_FAMILIES)}")
    return cls(**{**common, **kwargs, **overrides})


def build_tiny_model(family: str, task: str | None = None, seed: int = 0, **overrides: Any) -> nn.Module:
    """A seeded random model of ``family`` for ``task`` (see the module docstring); does not touch global RNG."""
    import transformers as tf

    task = task or ("classification" if family in ENCODER_FAMILIES else "causal-lm")
    if task == "classification":
        overrides.setdefault("num_labels", 2)
    config = _config(family, **overrides)
    auto = {"causal-lm": tf.AutoModelForCausalLM, "classification": tf.AutoModelForSequenceClassification,
            "base": tf.AutoModel}[task]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = auto.from_config(config)
    return model.eval()


@pytest.fixture
def make_tiny_model() -> Callable[..., nn.Module]:
    """Factory: ``make_tiny_model("llama")``, ``make_tiny_model("bert", task="base")``, ``(..., seed=1)``."""
    return build_tiny_model


@pytest.fixture
def tiny_llama() -> nn.Module:
    """LlamaForCausalLM, hidden 32, 2 blocks, 4 heads with 2 key/value heads (GQA), untied head."""
    return build_tiny_model("llama")


@pytest.fixture
def tiny_gpt2() -> nn.Module:
    """GPT2LMHeadModel, hidden 32, 2 blocks, 4 heads; its layers are Conv1D (weights stored (in, out))."""
    return build_tiny_model("gpt2")


@pytest.fixture
def tiny_opt() -> nn.Module:
    """OPTForCausalLM, hidden 32, 2 blocks, 4 heads, ffn 64."""
    return build_tiny_model("opt")


@pytest.fixture
def tiny_bert() -> nn.Module:
    """BertForSequenceClassification with 2 labels, hidden 32, 2 blocks, 4 heads."""
    return build_tiny_model("bert")


def build_tiny_tokenizer() -> Any:
    """The tokenizer behind the ``tiny_tokenizer`` fixture (built fresh, no files, no network)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'-")
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB - 4, special_tokens=["<unk>", "<pad>", "<s>", "</s>"],
                                  initial_alphabet=alphabet, show_progress=False)
    backend.train_from_iterator(TOKENIZER_TEXT, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                        bos_token="<s>", eos_token="</s>")
    assert len(tokenizer) <= TINY_VOCAB
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (PAD_ID, BOS_ID, EOS_ID)
    return tokenizer


@pytest.fixture
def tiny_tokenizer() -> Any:
    """A tiny BPE ``PreTrainedTokenizerFast`` whose ids fit every tiny model (see the module docstring)."""
    return build_tiny_tokenizer()


@pytest.fixture
def tiny_llama_dir(tmp_path: Path, tiny_llama: nn.Module, tiny_tokenizer: Any) -> Path:
    """A plain save_pretrained folder (no prunekit.json) holding ``tiny_llama`` and ``tiny_tokenizer``."""
    folder = tmp_path / "tiny-llama"
    tiny_llama.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder
