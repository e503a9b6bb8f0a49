"""Running the CLI in-process from tests, and the one-line error every bad input must give."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prunekit.cli.main import main

TEXT = " ".join(["It is a truth universally acknowledged, that a single man in possession of a good fortune, "
                 "must be in want of a wife. The quick brown fox jumps over the lazy dog."] * 60)


def saved_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved folder's safetensors shards, by name."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def text_corpus(folder: Path) -> str:
    """A small English text file written into ``folder``, as the ``text:PATH`` dataset name."""
    path = folder / "corpus.txt"
    path.write_text(TEXT)
    return f"text:{path}"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run ``prunekit ARGV`` in this process: (exit code, stdout, stderr); argparse's own exits count as codes."""
    capsys.readouterr()  # drop what fixtures printed (e.g. save_pretrained's progress bar)
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str, *fragments: str, bars: bool = False) -> None:
    """Exit 2 and a single ``prunekit: error:`` line holding every fragment (``bars``: progress bars may precede it)."""
    assert code == 2, err
    lines = err.strip().splitlines()
    if bars:
        lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("prunekit:")]
    assert len(lines) == 1 and lines[0].startswith("prunekit: error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], err
