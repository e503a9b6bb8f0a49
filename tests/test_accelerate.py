"""`prunekit train` under `accelerate launch` with two CPU processes (gloo): same sparsity, same masks on every rank.

accelerate 1.x runs ``--cpu`` jobs as ONE process (several need an MPI hostfile), so the launch uses
``--multi_gpu --num_processes 2`` with ``--device cpu``: on a machine without a GPU that starts two
processes that talk over gloo.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prunekit.masks import count_to_prune
from test_finetune import save_tiny_bert, toy_examples, write_csv


@pytest.mark.slow
def test_two_process_training_matches_the_target(tmp_path: Path) -> None:
    launcher = Path(sys.executable).with_name("accelerate")
    if not launcher.exists():
        pytest.skip("accelerate's launcher is not installed beside this Python")
    model_dir = save_tiny_bert(tmp_path / "bert")
    csv = write_csv(tmp_path / "toy.csv", toy_examples(200, 7))
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
    command = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
               "-m", "prunekit.cli.main", "train", str(model_dir), "--task", f"csv:{csv}", "--method", "mgpp",
               "--sparsity", "0.8", "--sigma0", "1e-6", "--batch-size", "8", "--max-length", "16", "--update-every",
               "2", "--eval-steps", "0", "--no-progress", "--device", "cpu", "--out", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "prunekit.json").read_text())
    training = record["training"]
    assert training["world_size"] == 2 and training["masks_agree_across_ranks"] is True
    assert training["total_steps"] == training["steps"] == 10  # 160 examples / (8 per process x 2 processes)
    prunable = sum(layer["params"] for layer in record["layers"].values())
    assert record["sparsity"]["total"] == pytest.approx(count_to_prune(prunable, 0.8) / prunable)
