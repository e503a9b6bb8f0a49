"""The README's Python API example runs as written, on a tiny random Llama and a small made-up text.

The built-in name "smollm2-135m" is pointed at a saved tiny model (``prunekit.models.builtin_folder``,
which the real ``load_model`` calls), and "austen" is a small text prepared into this test's own
cache (so the real ``load_data`` reads it). Everything else is the library as a user calls it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def section_python_blocks(text: str, heading: str) -> list[str]:
    """The ```python blocks between the markdown heading ``heading`` and the next heading of its level or above."""
    lines = text.splitlines()
    pattern = re.compile(r"^(#+)\s+(.*?)\s*$")
    start, level = None, 0
    for index, line in enumerate(lines):
        match = pattern.match(line)
        if match and match.group(2).strip().lower() == heading.lower():
            start, level = index + 1, len(match.group(1))
            break
    if start is None:
        return []
    end = len(lines)
    for index in range(start, len(lines)):
        match = pattern.match(lines[index])
        if match and len(match.group(1)) <= level:
            end = index
            break
    return re.findall(r"^```python\n(.*?)^```", "\n".join(lines[start:end]) + "\n", flags=re.M | re.S)


def test_section_python_blocks_finds_only_that_section() -> None:
    text = "# t\n## A\n```python\nx = 1\n```\n### sub\n```python\ny = 2\n```\n## B\n```python\nz = 3\n```\n"
    assert section_python_blocks(text, "A") == ["x = 1\n", "y = 2\n"]
    assert section_python_blocks(text, "B") == ["z = 3\n"]
    assert section_python_blocks(text, "C") == []


def recorded_method(record: dict[str, Any]) -> Any:
    """The method a record names: at its top level, or under the "pruning" key the example wrote."""
    found: Any = record.get("method")
    if not isinstance(found, str) and isinstance(record.get("pruning"), dict):
        pruning = record["pruning"]
        found = pruning.get("method") or (pruning.get("config") or {}).get("method")
    return found.get("method") if isinstance(found, dict) else found


def austen_stand_in() -> Any:
    """A TextData with the austen splits, long enough for 64 windows of 512 tiny-tokenizer tokens."""
    from prunekit.data import TextData

    sentences = [
        "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife.",
        "The quick brown fox jumps over the lazy dog.",
        "Pruning removes weights from a model; fine-tuning recovers what was lost.",
        "This movie was wonderful and the acting was great!",
    ]
    generator = torch.Generator().manual_seed(0)
    order = torch.randint(0, len(sentences), (4000,), generator=generator).tolist()
    text = " ".join(sentences[i] for i in order)
    return TextData("austen", {"calibration": text, "train": text, "eval": text[:5000]}, "test stand-in")


def test_readme_python_api_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           make_tiny_model: Callable[..., Any], tiny_tokenizer: Any) -> None:
    import prunekit
    import prunekit.models
    from prunekit.data.core import write_prepared

    blocks = section_python_blocks(README.read_text(encoding="utf-8"), "Python API")
    assert blocks, "README.md has no ```python block under a 'Python API' heading"
    code = "\n".join(blocks)
    assert "prunekit.save_model(" in code and '"sparsegpt"' in code

    # "smollm2-135m" -> a saved tiny Llama (positions for the example's 512-token windows)
    model_dir = tmp_path / "tiny-smollm2"
    make_tiny_model("llama", max_position_embeddings=1024).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    real_builtin_folder = prunekit.models.builtin_folder

    def builtin_folder(name: str, progress: bool = True) -> Path:
        return model_dir if name == "smollm2-135m" else real_builtin_folder(name, progress=progress)

    monkeypatch.setattr(prunekit.models, "builtin_folder", builtin_folder)
    # "austen" -> a small text prepared into this test's own cache (the conftest's PRUNEKIT_CACHE)
    write_prepared("austen", austen_stand_in(), source="test")

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    namespace: dict[str, Any] = {"__name__": "readme_example"}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - the README's own example

    out = work / "out" / "smollm2-sparsegpt50"
    assert (out / "config.json").is_file() and (out / "prunekit.json").is_file()
    assert list(out.glob("*.safetensors")), "no safetensors weights saved"

    model, tokenizer, record = prunekit.load(out)
    assert tokenizer is not None
    assert recorded_method(record) == "sparsegpt", record
    layers = prunekit.get_adapter(model).prunable_layers()
    assert layers
    for name, layer in layers.items():
        zeros = float((layer.weight == 0).float().mean())
        assert zeros == pytest.approx(0.5, abs=0.01), name
    assert float((model.lm_head.weight == 0).float().mean()) < 0.01  # the head is not pruned
    if "model" in namespace:  # the README reloads too: the same weights come back
        reloaded = dict(namespace["model"].named_parameters())
        for name, param in model.named_parameters():
            assert torch.equal(param, reloaded[name]), name


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_github_anchor() -> None:
    assert github_anchor("SparseGPT against the reference code, side by side") == (
        "sparsegpt-against-the-reference-code-side-by-side")
    assert github_anchor("FLOP: factorised while training") == "flop-factorised-while-training"
    assert github_anchor("One-shot pruning (`bench/oneshot.py`)") == "one-shot-pruning-benchoneshotpy"


def test_readme_and_docs_links_resolve() -> None:
    """Every relative link in README.md and docs/*.md names a file that exists, and a heading there if it has #."""
    root = README.parent
    pages = [README, *sorted((root / "docs").glob("*.md"))]
    checked = 0
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path_part, _, anchor = target.partition("#")
            file = (page.parent / path_part).resolve() if path_part else page
            assert file.exists(), f"{page.name}: link to missing {target}"
            if anchor:
                headings = re.findall(r"^#+\s+(.*)$", file.read_text(encoding="utf-8"), flags=re.M)
                assert anchor in {github_anchor(h) for h in headings}, f"{page.name}: no heading for {target}"
            checked += 1
    assert checked >= 8
