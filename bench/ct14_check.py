"""Cross-check: compressed-tensors 0.14 (the last release with bitmask compressors) reads prunekit's exports.

compressed-tensors dropped its sparse-bitmask / sparse-24-bitmask compressors after 0.14, and transformers 5
needs a newer release, so prunekit packs the bitmasks itself in the library's layout. This script installs
compressed-tensors 0.14 into a folder of its own (``pip install --target /tmp/ct14 --no-deps``), exports a
tiny random Llama whose block weights are half zero (random zeros; 2:4 zeros) in both formats, and
decompresses each weight file with 0.14's own compressors: every layer must equal the model cast to
bfloat16. Run: ``.venv/bin/python bench/ct14_check.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from tempfile import TemporaryDirectory

import torch

TARGET = Path("/tmp/ct14")


def main() -> int:
    if not (TARGET / "compressed_tensors").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(TARGET), "--no-deps",
                        "compressed-tensors==0.14.0"], check=True)
    sys.path.insert(0, str(TARGET))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import compressed_tensors
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.config import SparsityCompressionConfig
    from safetensors.torch import load_file

    from conftest import build_tiny_model, build_tiny_tokenizer
    from prunekit.adapters import get_adapter
    from prunekit.export import ExportSettings, export_model

    print(f"compressed-tensors {compressed_tensors.__version__} from {TARGET}")
    torch.manual_seed(0)
    failed = False
    for fmt in ("sparse-bitmask", "sparse-24-bitmask"):
        model = build_tiny_model("llama")
        layers = get_adapter(model).prunable_layers()
        with torch.no_grad():
            for layer in layers.values():
                weight = layer.weight
                if fmt == "sparse-24-bitmask":
                    groups = weight.abs().reshape(weight.shape[0], -1, 4)
                    smallest = groups.argsort(dim=-1)[..., :2]
                    mask = torch.ones_like(groups).scatter_(-1, smallest, 0).reshape(weight.shape)
                else:
                    mask = (torch.rand_like(weight) > 0.5).float()
                weight.mul_(mask)
        with TemporaryDirectory() as tmp:
            out = Path(tmp) / fmt
            export_model(model, build_tiny_tokenizer(), out, ExportSettings(format=fmt, dtype="bfloat16"),
                         record={"method": "cross-check"})
            sparsity = json.loads((out / "config.json").read_text())["quantization_config"]["sparsity_config"]
            config = SparsityCompressionConfig.load_from_registry(
                sparsity["format"], **{k: v for k, v in sparsity.items() if k != "format"})
            compressor = BaseCompressor.load_from_registry(config.format, config=config)
            decompressed = dict(compressor.decompress_from_state_dict(load_file(out / "model.safetensors")))
        worst, missing = 0.0, 0
        for name, layer in layers.items():
            got = decompressed.get(f"{name}.weight")  # the decompressed state dict: parameter names
            if got is None:
                missing += 1
                continue
            expected = layer.weight.detach().to(torch.bfloat16)
            worst = max(worst, float((got.to(torch.bfloat16) - expected).abs().max()))
        print(f"{fmt}: {len(layers) - missing} of {len(layers)} layers decompressed by compressed-tensors "
              f"{compressed_tensors.__version__}; largest difference to the model cast to bfloat16: {worst}")
        failed |= missing > 0 or worst > 0
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
