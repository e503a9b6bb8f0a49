"""prunekit beside llm-compressor (issue 11, part 5): same model, same calibration windows, same perplexity.

Protocol: smollm2-135m (the dequantised folder prunekit keeps in ~/.cache/prunekit/models); calibration =
the exact token ids of ``prunekit.data.calibration_batch`` (64 windows x 512 tokens of the austen
calibration split, seed 0), exported once to a .pt file and fed to llm-compressor's ``oneshot`` as a
dataset of ``input_ids``; perplexity of each saved model measured by prunekit's own code in prunekit's
virtual environment (``prunekit.evaluate.perplexity``, first 32,768 tokens of the austen eval split =
Persuasion, non-overlapping 512-token windows, no BOS), as bench/oneshot.py does.

llm-compressor runs in its own virtual environment (torch pinned by the same constraints file):

    python3 -m venv /work/peers-venv
    /work/peers-venv/bin/pip install -c constraints.txt torch==2.13.0 llmcompressor

One configuration per process. Each whole command (process start to exit: load, calibrate, prune,
save) runs under GNU ``/usr/bin/time -f '%e %M'`` (wall seconds, peak RSS) inside
``flock /tmp/prunekit-cpu.lock`` (one timing job on the machine at a time).

    python bench/peers.py                          # sparsegpt 50 %, then 2:4, both tools
    python bench/peers.py --configs 0.5 --recipe   # also prunekit's best recipe at 50 %
    python bench/peers.py --wanda                  # add llm-compressor's and prunekit's Wanda rows
    python bench/peers.py --wanda-only             # only those (rows already in peers.json are kept)
    python bench/peers.py --sequential             # also prunekit's sparsegpt with --sequential

Writes bench/results/peers.json and bench/results/peers.md (rows of earlier runs with other labels kept).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
LOCK = "/tmp/prunekit-cpu.lock"
PEERS_PYTHON = "/work/peers-venv/bin/python"
MODEL_DIR = Path.home() / ".cache" / "prunekit" / "models" / "smollm2-135m"
RECIPE = {"reconstruct-steps": "32", "reconstruct-lr": "3e-3", "micro-batch-size": "2"}


# ---------------------------------------------------------------- llm-compressor arm (runs in the peers venv)

def llmc_arm(args: argparse.Namespace) -> int:
    """Load the model, run llm-compressor's oneshot on the exported windows, save a plain model."""
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    torch.manual_seed(args.seed)
    ids = torch.load(args.calib_file)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    structure = "0:0" if args.structure == "unstructured" else args.structure
    if args.method == "sparsegpt":
        from llmcompressor.modifiers.pruning import SparseGPTModifier as Modifier
    else:
        from llmcompressor.modifiers.pruning import WandaPruningModifier as Modifier
    modifier = Modifier(sparsity=args.sparsity, mask_structure=structure, targets=["Linear"], ignore=["re:.*lm_head"])
    oneshot(model=model, dataset=data, recipe=[modifier], num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False)
    model.save_pretrained(args.out_dir, save_compressed=False)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(args.model_dir) / name, Path(args.out_dir) / name)
    return 0


# ---------------------------------------------------------------- orchestration (runs in prunekit's venv)

def export_calibration(args: argparse.Namespace, path: Path) -> dict[str, Any]:
    import torch

    from prunekit.data import calibration_batch, load_data
    from prunekit.models import load_model

    _model, tokenizer = load_model(args.model, progress=False)
    ids = calibration_batch(tokenizer, load_data(args.data), args.samples, args.seq_len, seed=args.seed)
    torch.save(ids.clone(), path)
    return {"shape": list(ids.shape), "first_ids": ids[0, :8].tolist(), "sum": int(ids.sum())}


def timed(command: list[str], workdir: Path) -> dict[str, Any]:
    """Run one whole command under the CPU lock and GNU time; wall seconds and peak RSS (MB)."""
    stats = workdir / "time.txt"
    full = ["flock", LOCK, "/usr/bin/time", "-f", "%e %M", "-o", str(stats), *command]
    load = os.getloadavg()
    proc = subprocess.run(full, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{proc.stderr[-4000:]}")
    wall, peak_kb = stats.read_text().split()[-2:]
    return {"wall_s": float(wall), "peak_rss_mb": int(peak_kb) / 1024, "load_average_before": round(load[0], 2),
            "load_average_after": round(os.getloadavg()[0], 2)}


def measure(folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Perplexity and sparsity of a saved model, by prunekit's code (its own process, under the lock)."""
    command = ["flock", LOCK, sys.executable, __file__, "--measure", str(folder), "--model", args.model,
               "--data", args.data, "--seq-len", str(args.seq_len), "--eval-tokens", str(args.eval_tokens)]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"measuring {folder} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_arm(args: argparse.Namespace) -> int:
    import torch

    from prunekit.data import eval_tokens, load_data
    from prunekit.evaluate import perplexity
    from prunekit.models import load_model

    _base, tokenizer = load_model(args.model, progress=False)  # the eval tokens exactly as bench/oneshot.py
    tokens = eval_tokens(tokenizer, load_data(args.data), max_tokens=args.eval_tokens)
    model, _tok = load_model(args.measure, progress=False)
    zeros = total = 0
    two_four = True
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
            weight = module.weight.detach()
            zeros += int((weight == 0).sum())
            total += weight.numel()
            groups = (weight.reshape(-1, 4) == 0).sum(dim=1)
            two_four = two_four and bool((groups >= 2).all())
    result = perplexity(model, tokens, seq_len=args.seq_len, progress=False)
    print(json.dumps({"perplexity": result.perplexity, "protocol": result.protocol, "eval_tokens": result.n_tokens,
                      "linear_sparsity": zeros / total, "exactly_2_4": two_four}))
    return 0


def variant_of(row: dict[str, Any]) -> str:
    """'' (plain), 'recon32' (the best recipe) or 'sequential' (rows written before variants: from 'recipe')."""
    return str(row.get("variant", "recon32" if row.get("recipe") else ""))


def run_config(tool: str, method: str, amount: str, args: argparse.Namespace, calib_file: Path,
               variant: str = "") -> dict[str, Any]:
    structure = amount if ":" in amount else "unstructured"
    with tempfile.TemporaryDirectory(prefix="prunekit-peers-") as tmp:
        work, out = Path(tmp), Path(tmp) / "out"
        if tool == "prunekit":
            flags = ["--structure", amount] if structure != "unstructured" else ["--sparsity", amount]
            if variant == "recon32":
                flags += [x for key, value in RECIPE.items() for x in (f"--{key}", value)]
            elif variant == "sequential":
                flags.append("--sequential")
            command = [sys.executable, "-m", "prunekit.cli.main", "prune", args.model, "--method", method, *flags,
                       "--calib", args.data, "--calib-samples", str(args.samples), "--seq-len", str(args.seq_len),
                       "--seed", str(args.seed), "--out", str(out)]
            shown = "prunekit " + " ".join(command[3:]).replace(str(out), "OUT")
        else:
            sparsity = "0.5" if structure != "unstructured" else amount
            command = [PEERS_PYTHON, __file__, "--llmc", "--method", method, "--sparsity", sparsity, "--structure",
                       structure, "--calib-file", str(calib_file), "--model-dir", str(args.model_dir),
                       "--out-dir", str(out), "--seed", str(args.seed)]
            shown = (f"llmcompressor oneshot {'SparseGPTModifier' if method == 'sparsegpt' else 'WandaPruningModifier'}"
                     f"(sparsity={sparsity}, mask_structure={'0:0' if structure == 'unstructured' else structure}, "
                     "targets=[Linear], ignore=[re:.*lm_head]) on the exported windows, "
                     "save_pretrained(save_compressed=False)")
        row: dict[str, Any] = {"tool": tool, "method": method, "amount": amount, "recipe": variant == "recon32",
                               "variant": variant,
                               "label": f"{tool} {method} {amount if ':' in amount else f'{float(amount):.0%}'}"
                                        + (f" +{variant}" if variant else ""), "command": shown}
        row.update(timed(command, work))
        row.update(measure(out, args))
    return row


TARGETS_NOTE = ("issue 11 targets against llm-compressor on the same work: perplexity no worse at 50 % and 2:4; "
                "whole command <= 0.6x its wall time; peak memory no higher")


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    by = {(r["tool"], r["method"], r["amount"], variant_of(r)): r for r in rows}
    for method, amount in [(m, a) for m in ("sparsegpt", "wanda") for a in ("0.5", "2:4")]:
        peer = by.get(("llm-compressor", method, amount, ""))
        if not peer:
            continue
        for variant in ("", "sequential", "recon32"):
            ours = by.get(("prunekit", method, amount, variant))
            if not ours:
                continue
            name = f"{method} {amount}" + {"": "", "sequential": " (prunekit +sequential)",
                                           "recon32": " (prunekit best recipe)"}[variant]
            ratio = ours["wall_s"] / peer["wall_s"]
            out += [{"configuration": name, "target": "perplexity no worse",
                     "figures": f"{ours['perplexity']:.2f} vs {peer['perplexity']:.2f}",
                     "met": ours["perplexity"] <= peer["perplexity"]},
                    {"configuration": name, "target": "whole command <= 0.6x",
                     "figures": f"{ours['wall_s']:.1f} s vs {peer['wall_s']:.1f} s = {ratio:.2f}x",
                     "met": ratio <= 0.6},
                    {"configuration": name, "target": "peak RSS no higher",
                     "figures": f"{ours['peak_rss_mb']:.0f} MB vs {peer['peak_rss_mb']:.0f} MB",
                     "met": ours["peak_rss_mb"] <= peer["peak_rss_mb"]}]
    return out


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = ["# prunekit beside llm-compressor (issue 11, part 5)", "",
             f"- model: {meta['model']} ({meta['model_dir']}, float32); data: {meta['data']}",
             f"- calibration: the same {meta['samples']} x {meta['seq_len']} token windows for both tools "
             f"(prunekit.data.calibration_batch, seed {meta['seed']}, austen calibration split; exported ids "
             f"{meta['calibration']}), fed to llm-compressor's oneshot as a dataset of input_ids",
             f"- perplexity: {meta['protocol']}, by prunekit's code on each saved model",
             f"- machine: {meta['machine']}; load average at start {meta['load']}; each timed command under "
             f"flock {LOCK} (no other timing job at the same time; other work may share the cores)",
             f"- versions: {meta['versions']}", f"- date: {meta['date']}", "",
             "Wall time and peak RSS are of the whole command (process start to exit: load, calibrate, prune, save), "
             "GNU /usr/bin/time -f '%e %M'.", "",
             "| tool | configuration | perplexity | wall s | peak RSS MB | linear sparsity | load avg before |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['tool']} | {r['label'].split(' ', 1)[1]} | {r['perplexity']:.2f} | {r['wall_s']:.1f} | "
                     f"{r['peak_rss_mb']:.0f} | {100 * r['linear_sparsity']:.2f}%"
                     f"{' (2:4)' if r['exactly_2_4'] and ':' in r['amount'] else ''} | {r['load_average_before']} |")
    lines += ["", f"## Targets ({TARGETS_NOTE})", "", "| configuration | target | prunekit vs llm-compressor | |",
              "|---|---|---|---|"]
    for t in targets(rows):
        verdict = "met" if t["met"] else "**missed**"
        lines.append(f"| {t['configuration']} | {t['target']} | {t['figures']} | {verdict} |")
    lines += ["", "Notes: llm-compressor's command is its whole process in its own venv (python start, imports, "
              "from_pretrained, oneshot with its default sequential pipeline, save_pretrained uncompressed); "
              "lm_head is left dense by both tools (tied to the embeddings). The two venvs hold different "
              "transformers versions (llmcompressor pins its own); perplexity of both saved models is measured "
              "in prunekit's venv by the same code. One run per row, so wall times carry run-to-run noise of a "
              "few percent on shared cores."]
    lines += ["", "Commands:", ""] + [f"- {r['label']}: `{r['command']}`" for r in rows]
    return "\n".join(lines) + "\n"


def versions() -> str:
    out = []
    for python, names in ((sys.executable, "prunekit torch transformers"),
                          (PEERS_PYTHON, "llmcompressor compressed_tensors torch transformers")):
        code = ("import importlib.metadata as m, sys; print(' '.join(f'{n}=={m.version(n.replace(\"_\", \"-\"))}' "
                f"for n in {names.split()!r}))")
        proc = subprocess.run([python, "-c", code], capture_output=True, text=True)
        out.append(("prunekit venv: " if python == sys.executable else "llm-compressor venv: ") + proc.stdout.strip())
    return "; ".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="0.5,2:4", help="comma-separated sparsegpt amounts (0.5, 2:4)")
    parser.add_argument("--recipe", action="store_true", help="also prunekit's best recipe (50 %% only)")
    parser.add_argument("--recipe-only", action="store_true", help="only prunekit's best recipe rows")
    parser.add_argument("--wanda", action="store_true", help="also Wanda, both tools")
    parser.add_argument("--sequential", action="store_true",
                        help="also prunekit's sparsegpt with --sequential (after each sparsegpt pair)")
    parser.add_argument("--wanda-only", action="store_true", help="only the Wanda rows, both tools")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--model-dir", default=str(MODEL_DIR))
    parser.add_argument("--data", default="austen")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=32768)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS))
    # internal: the llm-compressor arm and the measuring arm
    parser.add_argument("--llmc", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--method", default="sparsegpt", help=argparse.SUPPRESS)
    parser.add_argument("--sparsity", type=float, default=0.5, help=argparse.SUPPRESS)
    parser.add_argument("--structure", default="unstructured", help=argparse.SUPPRESS)
    parser.add_argument("--calib-file", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.llmc:
        return llmc_arm(args)
    if args.measure:
        return measure_arm(args)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    calib_dir = Path(tempfile.mkdtemp(prefix="prunekit-peers-calib-"))
    calib_file = calib_dir / "calibration_ids.pt"
    calib = export_calibration(args, calib_file)
    meta = {"model": args.model, "model_dir": args.model_dir, "data": args.data, "samples": args.samples,
            "seq_len": args.seq_len, "seed": args.seed, "eval_tokens": args.eval_tokens, "calibration": calib,
            "protocol": f"first {args.eval_tokens} tokens of the austen eval split (Persuasion), non-overlapping "
                        f"{args.seq_len}-token windows, no BOS (prunekit.evaluate.perplexity)",
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": versions()}
    plan: list[tuple[str, str, str, str]] = []
    for amount in args.configs.split(","):
        if not args.recipe_only and not args.wanda_only:
            plan += [("prunekit", "sparsegpt", amount, ""), ("llm-compressor", "sparsegpt", amount, "")]
            if args.sequential:
                plan.append(("prunekit", "sparsegpt", amount, "sequential"))
        if (args.wanda or args.wanda_only) and not args.recipe_only:
            plan += [("prunekit", "wanda", amount, ""), ("llm-compressor", "wanda", amount, "")]
    if (args.recipe or args.recipe_only) and "0.5" in args.configs.split(","):  # last: the pairs come first
        plan.append(("prunekit", "sparsegpt", "0.5", "recon32"))
    path = out / "peers.json"
    rows: list[dict[str, Any]] = json.loads(path.read_text())["results"] if path.exists() else []
    for tool, method, amount, variant in plan:
        row = run_config(tool, method, amount, args, calib_file, variant)
        rows = [r for r in rows if r["label"] != row["label"]] + [row]
        print(f"{row['label']:<40} ppl {row['perplexity']:8.2f}  wall {row['wall_s']:6.1f} s  "
              f"peak {row['peak_rss_mb']:6.0f} MB", flush=True)
        path.write_text(json.dumps({"meta": meta, "results": rows, "targets": targets(rows)}, indent=2) + "\n")
        (out / "peers.md").write_text(markdown(meta, rows))  # after every row: a cut-off run leaves what it has
    shutil.rmtree(calib_dir, ignore_errors=True)
    print(f"wrote {path} and {out / 'peers.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
