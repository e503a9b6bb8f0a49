"""The worked example of docs/adding-a-method.md is a real method: one file, registered once, usable everywhere."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.masks import Structure
from prunekit.methods import available_methods, get_method, method_config
from prunekit.methods.registry import registered
from prunekit.pruning import prune

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "max_activation.py"


@pytest.fixture(scope="module")
def example():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("max_activation_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    registered().pop("max-activation", None)
    sys.modules.pop(spec.name, None)


def test_the_documented_file_is_the_tested_file() -> None:
    text = (Path(__file__).resolve().parents[1] / "docs" / "adding-a-method.md").read_text()
    assert "docs/examples/max_activation.py" in text


def test_example_method_golden_mask(example) -> None:  # type: ignore[no-untyped-def]
    layer = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]]))
    method = example.MaxActivation(method_config("max-activation", sparsity=0.5), 4)
    method.add_batch(torch.tensor([[[4.0, -1.0, 0.0, 0.5], [-2.0, 0.5, 1.0, 0.0]]]))
    # peak |X_j| = [4, 1, 1, 0.5]; scores row 0 = [4, 2, 3, 2] -> keep inputs 0, 2 (the tie 2/2 drops both);
    # row 1 = [16, 3, 2, 0.5] -> keep inputs 0, 1
    mask = method.prune(layer, 0.5, Structure())
    assert mask.tolist() == [[True, False, True, False], [True, True, False, False]]


def test_example_method_is_listed_validated_and_runs(example, tiny_llama: nn.Module) -> None:  # type: ignore[no-untyped-def]
    spec = get_method("max-activation")
    assert spec.kind == "one-shot" and "max-activation" in [s.name for s in available_methods("one-shot")]
    assert [s.name for s in spec.config.settings()][-1] == "compare"
    with pytest.raises(PrunekitError, match="method max-activation does not take dampening"):
        method_config("max-activation", sparsity=0.5, dampening=0.1)
    with pytest.raises(PrunekitError, match="needs calibration data"):
        prune(tiny_llama, {"method": "max-activation", "sparsity": 0.5}, None, progress=False)
    calibration = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    result = prune(tiny_llama, {"method": "max-activation", "sparsity": 0.5}, calibration, progress=False)
    assert result.sparsity == pytest.approx(0.5)
    assert result.record()["method"] == "max-activation"
