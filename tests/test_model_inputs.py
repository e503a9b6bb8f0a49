"""Model inputs: GGUF files given by path, and damaged or unknown model folders (one-line errors, exit 2).

A GGUF file is dequantised once into the cache (as the built-in smollm2 GGUF is) by every command
that loads a model; the converted model computes what the model written into the file computed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import prunekit.models as models
from prunekit.errors import PrunekitError
from prunekit.models import load_model
from test_cli_prune import TEXT, one_line_error, run
from test_models import GGUF_MERGES, GGUF_TOKENS, tiny_gguf_source, write_tiny_gguf

IDS = torch.tensor([[1, 5, 9, 96, 97, 3, 40, 41, 99]])
QWEN2_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def logits(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def write_header(writer: Any, arch_config: Any) -> None:
    writer.add_context_length(arch_config.max_position_embeddings)
    writer.add_embedding_length(arch_config.hidden_size)
    writer.add_block_count(arch_config.num_hidden_layers)
    writer.add_feed_forward_length(arch_config.intermediate_size)
    writer.add_head_count(arch_config.num_attention_heads)
    writer.add_head_count_kv(arch_config.num_key_value_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(GGUF_TOKENS)
    writer.add_token_types([3] + [1] * (len(GGUF_TOKENS) - 1))
    writer.add_token_merges(GGUF_MERGES)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)


def write_qwen2_gguf(path: Path) -> Qwen2ForCausalLM:
    """A tiny Qwen2 (q/k/v biases, grouped-query) written with llama.cpp's names; returns the original."""
    import gguf

    config = Qwen2Config(vocab_size=len(GGUF_TOKENS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6,
                         tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config).eval()
        for param in model.parameters():
            if param.dim() == 1:
                param.data.normal_(1.0, 0.1)
    writer = gguf.GGUFWriter(str(path), "qwen2")
    write_header(writer, config)
    state = {name: t.detach().numpy().astype(np.float32) for name, t in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    for index in range(config.num_hidden_layers):
        for hf_name, cpp_name in QWEN2_NAMES.items():
            for kind in ("weight", "bias"):
                key = f"model.layers.{index}.{hf_name}.{kind}"
                if key in state:
                    writer.add_tensor(f"blk.{index}.{cpp_name}.{kind}", np.ascontiguousarray(state[key]))
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    writer.add_tensor("output.weight", state["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


@pytest.fixture
def llama_gguf(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    original = tiny_gguf_source()
    return write_tiny_gguf(tmp_path / "tiny-llama.Q.gguf", original), original


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def cache_entries(cache: Path) -> list[str]:
    folder = cache / "models" / "gguf"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ---- GGUF files as input -------------------------------------------------------------------------------------
def test_a_gguf_path_loads_the_model_it_holds(llama_gguf: tuple[Path, torch.nn.Module], prunekit_cache: Path) -> None:
    gguf_file, original = llama_gguf
    model, tokenizer = load_model(str(gguf_file), progress=False)
    torch.testing.assert_close(logits(model), logits(original), atol=1e-5, rtol=0)
    assert tokenizer.convert_ids_to_tokens(tokenizer("the")["input_ids"]) == ["th", "e"]
    assert len(cache_entries(prunekit_cache)) == 1 and cache_entries(prunekit_cache)[0].startswith("tiny-llama.Q-")


def test_another_architecture_converts_too(tmp_path: Path) -> None:
    original = write_qwen2_gguf(tmp_path / "tiny-qwen2.gguf")
    model, _tokenizer = load_model(str(tmp_path / "tiny-qwen2.gguf"), progress=False)
    assert type(model) is Qwen2ForCausalLM
    torch.testing.assert_close(logits(model), logits(original), atol=1e-5, rtol=0)


def test_prune_and_eval_a_gguf_converting_it_once(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                  llama_gguf: tuple[Path, torch.nn.Module], text_file: Path,
                                                  monkeypatch: pytest.MonkeyPatch, prunekit_cache: Path) -> None:
    gguf_file, original = llama_gguf
    before = hashlib.sha256(gguf_file.read_bytes()).hexdigest()
    out = tmp_path / "pruned"
    code, stdout, err = run(capsys, "prune", str(gguf_file), "--method", "magnitude", "--sparsity", "0.5",
                            "--out", str(out), "--device", "cpu")
    assert code == 0, err
    assert "converting tiny-llama.Q.gguf once" in stdout
    pruned, _tokenizer = load_model(str(out))
    weight = pruned.model.layers[1].mlp.down_proj.weight
    assert float((weight == 0).float().mean()) == pytest.approx(0.5, abs=0.02)
    assert hashlib.sha256(gguf_file.read_bytes()).hexdigest() == before  # the source is never written

    def converted_twice(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("converted twice")

    monkeypatch.setattr(models, "convert_gguf", converted_twice)
    code, stdout, err = run(capsys, "eval", str(gguf_file), "--data", f"text:{text_file}", "--seq-len", "16",
                            "--max-tokens", "64", "--no-latency", "--device", "cpu")
    assert code == 0, err
    assert len(cache_entries(prunekit_cache)) == 1


def write_unsupported_gguf(path: Path) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), "mystery")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("damage", ["unsupported architecture", "cut short", "not gguf"])
def test_bad_gguf_files_are_refused_in_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                llama_gguf: tuple[Path, torch.nn.Module], prunekit_cache: Path,
                                                damage: str) -> None:
    gguf_file, _original = llama_gguf
    if damage == "unsupported architecture":
        bad, fragment = write_unsupported_gguf(tmp_path / "odd.gguf"), "holds a 'mystery' model"
    elif damage == "cut short":
        bad, fragment = tmp_path / "short.gguf", "is not a readable GGUF file"
        bad.write_bytes(gguf_file.read_bytes()[: gguf_file.stat().st_size // 3])
    else:
        bad, fragment = tmp_path / "text.gguf", "is not a readable GGUF file"
        bad.write_text("this is not a GGUF file\n" * 20)
    source = bad.read_bytes()
    out = tmp_path / "out"
    code, _stdout, err = run(capsys, "prune", str(bad), "--method", "magnitude", "--sparsity", "0.5",
                             "--out", str(out))
    one_line_error(code, err, fragment)
    assert not out.exists() and bad.read_bytes() == source
    assert cache_entries(prunekit_cache) == []  # nothing half-converted in the cache
    if damage == "unsupported architecture":
        assert "it reads llama" in err and "upgrade transformers" in err


# ---- damaged and unknown model folders ---------------------------------------------------------------------
def saved_llama(folder: Path, shards: bool = False) -> Path:
    from conftest import build_tiny_model, build_tiny_tokenizer

    build_tiny_model("llama").save_pretrained(folder, max_shard_size="20KB" if shards else "5GB")
    build_tiny_tokenizer().save_pretrained(folder)
    return folder


def folder_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def truncate(folder: Path) -> str:
    file = folder / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    return "model.safetensors' is damaged"


def drop_shard(folder: Path) -> str:
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    return f"lacks the weight shard {shards[-1].name}"


def unknown_type(folder: Path) -> str:
    config = folder / "config.json"
    config.write_text(config.read_text().replace('"model_type": "llama"', '"model_type": "mystery"'))
    return "type 'mystery', which transformers"


@pytest.mark.parametrize("command", ["eval", "prune"])
@pytest.mark.parametrize("damage", [truncate, drop_shard, unknown_type], ids=["truncated", "missing-shard", "unknown"])
def test_damaged_or_unknown_folders_give_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                  text_file: Path, command: str, damage: Any) -> None:
    folder = saved_llama(tmp_path / "model", shards=damage is drop_shard)
    fragment = damage(folder)
    before = folder_digest(folder)
    out = tmp_path / "out"
    args = ["--data", f"text:{text_file}"] if command == "eval" else ["--method", "magnitude", "--sparsity", "0.5",
                                                                        "--out", str(out)]
    code, _stdout, err = run(capsys, command, str(folder), *args)
    one_line_error(code, err, fragment)
    assert not out.exists() and folder_digest(folder) == before


def test_prunekit_load_checks_the_weights_too(tmp_path: Path) -> None:
    folder = saved_llama(tmp_path / "model")
    (folder / "prunekit.json").write_text("{}")
    truncate(folder)
    with pytest.raises(PrunekitError, match="model.safetensors' is damaged"):
        models.load(folder)


def test_a_family_without_adapter_or_blocks_is_refused_and_nothing_written(capsys: pytest.CaptureFixture[str],
                                                                           tmp_path: Path) -> None:
    """A model transformers can build (registered here) whose blocks prunekit cannot find."""
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

    class BlocklessConfig(PretrainedConfig):
        model_type = "prunekit-blockless"

    class BlocklessModel(PreTrainedModel):
        config_class = BlocklessConfig

        def __init__(self, config: BlocklessConfig) -> None:
            super().__init__(config)
            self.embed = torch.nn.Embedding(100, 8)
            self.head = torch.nn.Linear(8, 100)
            self.post_init()

        def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> Any:
            from transformers.modeling_outputs import CausalLMOutput

            return CausalLMOutput(logits=self.head(self.embed(input_ids)))

    AutoConfig.register(BlocklessConfig.model_type, BlocklessConfig, exist_ok=True)
    AutoModelForCausalLM.register(BlocklessConfig, BlocklessModel, exist_ok=True)
    folder = tmp_path / "blockless"
    BlocklessModel(BlocklessConfig(architectures=["BlocklessModel"])).save_pretrained(folder)
    from conftest import build_tiny_tokenizer

    build_tiny_tokenizer().save_pretrained(folder)
    before = folder_digest(folder)
    out = tmp_path / "out"
    code, _stdout, err = run(capsys, "prune", str(folder), "--task", "causal-lm", "--method", "magnitude",
                             "--sparsity", "0.5", "--out", str(out))
    one_line_error(code, err, "no adapter for model type 'prunekit-blockless' and no transformer blocks found")
    assert not out.exists() and folder_digest(folder) == before
