"""`prunekit export MODEL --format sparse-bitmask --dtype bf16 --out DIR`: a pruned model, really smaller on disk.

The block weights are stored in a compressed-tensors format (bitmask for the zeros, int8 / int4 for the
values, or both); the folder reloads with `prunekit.load` (and, for --format dense, plain transformers).
"""

from __future__ import annotations

import argparse
from typing import Any

from prunekit.cli.common import add_common, maybe_print_config, resolve

DEFAULTS: dict[str, Any] = {"model": None, "out": None, "overwrite": False, "format": "sparse-bitmask",
                            "quantize": "none", "group_size": 128, "dtype": "bfloat16"}


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "export", help="store a pruned model compressed: sparse bitmasks, int8 / int4 weights",
        description="Write MODEL (a folder written by prunekit, any model folder or a built-in name) with its "
                    "transformer-block weights in a compressed-tensors format: --format sparse-bitmask (any "
                    "zeros), sparse-24-bitmask (2:4 zeros) or dense, values in --dtype, optionally --quantize "
                    "int8 (per output channel) or int4 (per --group-size inputs, with --format dense). Every zero "
                    "is kept; the folder reloads with prunekit.load.")
    parser.add_argument("model", nargs="?", default=None, help="a pruned model folder, a model folder or built-in")
    parser.add_argument("--out", default=None, help="output folder (refused if it exists, unless --overwrite)")
    parser.add_argument("--overwrite", action="store_const", const=True, default=None,
                        help="replace an existing output folder (only once the new one is complete)")
    parser.add_argument("--format", default=None, help="sparse-bitmask (default), sparse-24-bitmask or dense")
    parser.add_argument("--quantize", default=None, help="none (default), int8 or int4")
    parser.add_argument("--group-size", type=int, default=None, help="inputs per int4 scale (default 128)")
    parser.add_argument("--dtype", default=None, help="bfloat16 (default), float16 or float32: stored values")
    add_common(parser, with_device=False)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from prunekit.errors import PrunekitError
    from prunekit.evaluate.size import weight_files
    from prunekit.export import ExportSettings, export_folder, read_record
    from prunekit.models import resolve_model_source

    settings = resolve(args, DEFAULTS)
    if maybe_print_config(args, settings):
        return 0
    export = ExportSettings(format=str(settings["format"]), dtype=str(settings["dtype"]),
                            quantize=str(settings["quantize"]), group_size=int(settings["group_size"]))
    if not settings["model"]:
        raise PrunekitError("no model given: prunekit export PRUNED_DIR --format sparse-bitmask --out DIR")
    if not settings["out"]:
        raise PrunekitError("no output folder given: add --out DIR")
    out = export_folder(settings["model"], settings["out"], export, overwrite=bool(settings["overwrite"]))
    source, _ = resolve_model_source(str(settings["model"]), progress=False)
    before = sum(f.stat().st_size for f in weight_files(source))
    after = sum(f.stat().st_size for f in weight_files(out))
    info = read_record(out)["export"]
    print(f"exported {info['layers']} block layers as {info['storage']} ({info['values']}): weights "
          f"{after / 1e6:.1f} MB, {after / before:.2f}x the source's {before / 1e6:.1f} MB; saved to {out}")
    if not info["plain_transformers"]:
        print("reload with prunekit.load (plain transformers cannot read bitmask formats: compressed-tensors "
              "0.15+ dropped them)")
    return 0
