"""Export: save a model so it reloads anywhere, with a prunekit record beside it; compressed and quantised forms.

* :func:`save_model` writes a plain ``save_pretrained`` folder (safetensors) plus ``prunekit.json``
  (:mod:`prunekit.export.saving`);
* :func:`export_model` / :func:`export_folder` write the block weights in a compressed-tensors format:
  ``sparse-bitmask``, ``sparse-24-bitmask``, int8 / int4 quantised, or both (:mod:`prunekit.export.compressed`);
* :func:`int8_dynamic` makes an int8 dynamically quantised copy for CPU inference (:mod:`prunekit.export.runtime`).

:func:`load` and :func:`read_record` (from :mod:`prunekit.models`) read any of these folders back.
"""

from __future__ import annotations

from prunekit.export.compressed import (
    FORMATS,
    QUANTIZATIONS,
    ExportSettings,
    export_folder,
    export_layers,
    export_model,
)
from prunekit.export.runtime import int8_dynamic
from prunekit.export.saving import (
    RECORD_NAME,
    full_record,
    load,
    read_record,
    save_model,
    to_jsonable,
    update_record,
    write_record,
)

__all__ = ["FORMATS", "QUANTIZATIONS", "RECORD_NAME", "ExportSettings", "export_folder", "export_layers",
           "export_model", "full_record", "int8_dynamic", "load", "read_record", "save_model", "to_jsonable",
           "update_record", "write_record"]
