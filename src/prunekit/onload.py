"""Sequential onloading: prune a model that does not fit in memory, one block at a time.

The model is built as a skeleton on the ``meta`` device (no weights; buffers such as rotary
frequencies are real). When the engine reaches a block, :class:`Onloader` reads that block's weights
from the safetensors files (memory-mapped, a fresh handle per block) onto the compute device; when the
engine is done with it, the pruned weights are written into pre-planned safetensors shards in the
(temporary) output folder and the block goes back to ``meta``. Embeddings, final norm and head are read
only while the calibration batch runs through them, and copied to the output from the source files.
Peak memory is the runtime, about two blocks, the embeddings while they are used, and the calibration
activations, whatever the model's depth.

The shards' layout (names, shapes, dtypes, offsets) is known before pruning starts, so every shard is
created at its full size first (``posix_fallocate``: a disk that is too small fails before the long
work) and each block's tensors are written at their offsets when the block is done. The files are
ordinary safetensors files: the folder reloads with plain ``from_pretrained``.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.models import auto_class

ONLOAD_CHOICES = ("auto", "always", "never")
SHARD_BYTES = 5 * 1024**3  # at most this much per output shard (one tensor larger than this gets its own)
DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
               torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
               torch.bool: "BOOL"}


class OnloadUnsupported(Exception):
    """This model or run cannot be onloaded; the message says why (the caller loads the whole model)."""


def available_memory() -> int:
    """Bytes of memory this process may still use: MemAvailable, capped by a cgroup limit when there is one."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):  # pragma: no cover - every Unix has one of the two
            available = 1 << 62
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            if limit != "max" and int(limit) < 1 << 60:
                available = min(available, int(limit) - int(Path(usage_file).read_text().strip()))
        except (OSError, ValueError):
            continue
    return max(0, available)


_TRIM: Any = None  # glibc's malloc_trim once return_freed_memory() has set the allocator up, else None


def return_freed_memory(threshold: int = 4 << 20) -> bool:
    """Keep the onloaded job's resident memory at what is really in use: glibc set up once, trimmed per block.

    Left alone, glibc raises its mmap threshold each time a large block is freed, after which tensors of tens
    of MB come from the heap and stay resident when freed (fragmentation): pruning smollm2-135m then peaked
    near 1.0-1.2 GB where 0.65 GB were live. Here the threshold is fixed at ``threshold`` bytes (allocations
    above it get their own mapping, unmapped when freed), and :func:`release_freed_memory` (called as each
    block is left) hands the heap's free pages back with ``malloc_trim``. Activations below the threshold
    are reused from the heap within a block instead of being mapped and faulted in afresh each time, which
    cost 1.2x the full load's wall time with a 1 MiB threshold. Process-wide, so only the onloaded jobs,
    whose point is bounded memory, call it. False where the C library has no ``mallopt`` (musl, macOS).
    """
    import ctypes
    import ctypes.util

    global _TRIM
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt, trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        return False
    m_mmap_threshold = -3
    try:  # PRUNEKIT_MMAP_THRESHOLD=BYTES overrides; 0 leaves glibc's own (faster, higher peak: see the README)
        threshold = int(os.environ.get("PRUNEKIT_MMAP_THRESHOLD", threshold))
    except ValueError as exc:
        raise PrunekitError(f"PRUNEKIT_MMAP_THRESHOLD={os.environ['PRUNEKIT_MMAP_THRESHOLD']!r} is not a number of "
                            "bytes: unset it or give e.g. 4194304") from exc
    if threshold <= 0:
        return False
    if not mallopt(m_mmap_threshold, int(threshold)):
        return False
    _TRIM = trim
    return True


def release_freed_memory() -> None:
    """Give the heap's free pages back to the system (after :func:`return_freed_memory`; otherwise nothing)."""
    if _TRIM is not None:
        _TRIM(0)


def weight_bytes(folder: Path, dtype: torch.dtype | None = None) -> int:
    """Bytes the folder's weights take in memory (in ``dtype`` when given), read from the file headers."""
    try:
        files = WeightFiles(folder)
    except OnloadUnsupported:  # no safetensors files (pickled weights): never onloaded
        return 0
    size = dtype.itemsize if dtype is not None else None
    return sum(entry.numel * (size or entry.dtype.itemsize) for entry in files.entries.values())


def should_onload(choice: str, folder: Path, dtype: torch.dtype | None = None) -> bool:
    """``always``/``never`` as said; ``auto``: when twice the weights' bytes exceed the memory available.

    A full load needs about twice the weights (the model, plus the pruned copy and the activations).
    """
    if choice not in ONLOAD_CHOICES:
        raise PrunekitError(f"--onload {choice}: use one of {', '.join(ONLOAD_CHOICES)}")
    if choice != "auto":
        return choice == "always"
    return 2 * weight_bytes(folder, dtype) > available_memory()


class _Entry:
    """One tensor of a source safetensors file, known from its header."""

    def __init__(self, file: Path, key: str, shape: list[int], dtype: torch.dtype) -> None:
        self.file, self.key, self.shape, self.dtype = file, key, shape, dtype
        self.numel = 1
        for dim in shape:
            self.numel *= int(dim)


class WeightFiles:
    """The tensors of a folder's safetensors files by name, from their headers (no weight is read)."""

    def __init__(self, folder: Path) -> None:
        from safetensors import safe_open

        self.folder = folder
        index = folder / "model.safetensors.index.json"
        if index.exists():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            names = [file.name for file in sorted(folder.glob("*.safetensors"))]
        if not names:
            raise OnloadUnsupported(f"'{folder}' has no safetensors weights")
        self.entries: dict[str, _Entry] = {}
        for name in names:
            with safe_open(str(folder / name), framework="pt") as handle:
                for key in handle.keys():
                    piece = handle.get_slice(key)
                    self.entries[key] = _Entry(folder / name, key, list(piece.get_shape()),
                                               _torch_dtype(piece.get_dtype()))

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The tensors of ``keys``, each file opened afresh (memory-mapped) and closed again."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.entries[key].file, []).append(key)
        out: dict[str, torch.Tensor] = {}
        for file, file_keys in by_file.items():
            try:
                with safe_open(str(file), framework="pt") as handle:
                    for key in file_keys:
                        out[key] = handle.get_tensor(key)
            except Exception as exc:  # safetensors raises its own types for a damaged file
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise PrunekitError(f"cannot read weights from '{file}' ({first}): the file was cut short or "
                                    "changed while pruning; copy the model again") from exc
        return out


def _torch_dtype(name: str) -> torch.dtype:
    for dtype, short in DTYPE_NAMES.items():
        if short == name:
            return dtype
    raise OnloadUnsupported(f"tensors of type {name} in the weight files")


def build_skeleton(folder: Path, task: str, dtype: torch.dtype) -> nn.Module:
    """The model of ``folder`` with every parameter on ``meta`` (buffers real), its generation config loaded."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(str(folder))
    with init_empty_weights(include_buffers=False):
        model = auto_class(task).from_config(config, dtype=dtype)
    if callable(getattr(model, "tie_weights", None)):
        model.tie_weights()  # from_pretrained ties the head to the embeddings; an empty model is not yet tied
    if (folder / "generation_config.json").exists() and getattr(model, "generation_config", None) is not None:
        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    model.eval()
    return model


class _Group:
    """One parameter as the output stores it: its name, its source key, and every (module, attribute) holding it."""

    def __init__(self, name: str, slots: list[tuple[str, nn.Module, str]]) -> None:
        self.name = name
        self.slots = slots
        self.source: str | None = None

    @property
    def parameter(self) -> nn.Parameter:
        _, module, attr = self.slots[0]
        return module._parameters[attr]  # type: ignore[return-value]

    def assign(self, value: torch.Tensor) -> None:
        old = self.parameter
        new = nn.Parameter(value, requires_grad=old.requires_grad)
        for _, module, attr in self.slots:
            module._parameters[attr] = new

    def free(self) -> None:
        old = self.parameter
        self.assign(torch.empty(old.shape, dtype=old.dtype, device="meta"))


class ShardWriter:
    """Safetensors shards planned in full before any weight is known, filled in as blocks are finished."""

    def __init__(self, folder: Path, tensors: list[tuple[str, list[int], torch.dtype]],
                 shard_bytes: int | None = None) -> None:
        self.folder = folder
        shard_bytes = SHARD_BYTES if shard_bytes is None else shard_bytes
        shards: list[list[tuple[str, list[int], torch.dtype]]] = [[]]
        size = 0
        for item in tensors:
            nbytes = _nbytes(item[1], item[2])
            if shards[-1] and size + nbytes > shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(item)
            size += nbytes
        count = len(shards)
        self.files: list[Path] = []
        self.where: dict[str, tuple[int, int, int]] = {}  # name -> (shard, offset in file, bytes)
        self.headers: list[bytes] = []
        self.sizes: list[int] = []
        for number, shard in enumerate(shards):
            name = "model.safetensors" if count == 1 else f"model-{number + 1:05d}-of-{count:05d}.safetensors"
            header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
            offset = 0
            for tensor_name, shape, dtype in shard:
                nbytes = _nbytes(shape, dtype)
                header[tensor_name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                                       "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            text = json.dumps(header, separators=(",", ":")).encode("utf-8")
            text += b" " * (-len(text) % 8)
            start = 8 + len(text)
            for tensor_name, shape, dtype in shard:
                begin = header[tensor_name]["data_offsets"][0]
                self.where[tensor_name] = (number, start + begin, _nbytes(shape, dtype))
            self.files.append(folder / name)
            self.headers.append(len(text).to_bytes(8, "little") + text)
            self.sizes.append(start + offset)
        self.written: set[str] = set()
        self.fds: list[int] = []

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes)

    def open(self) -> None:
        """Create every shard at its full size (a disk that is too small fails here, before any pruning)."""
        import shutil

        free = shutil.disk_usage(self.folder).free
        if free < self.total_bytes:
            raise _no_space(self.folder, self.total_bytes, free)
        for file, header, size in zip(self.files, self.headers, self.sizes, strict=True):
            fd = os.open(file, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self.fds.append(fd)
            with _disk_errors(self.folder, self.total_bytes):
                try:
                    os.posix_fallocate(fd, 0, size)
                except OSError as exc:
                    if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                        raise
                    os.ftruncate(fd, size)
                os.pwrite(fd, header, 0)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor at its planned place."""
        shard, offset, nbytes = self.where[name]
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        if data.nbytes != nbytes:
            raise RuntimeError(f"{name}: {data.nbytes} bytes, {nbytes} planned")
        with _disk_errors(self.folder, self.total_bytes):
            view = memoryview(data)  # type: ignore[arg-type]
            while view:
                done = os.pwrite(self.fds[shard], view, offset)
                view, offset = view[done:], offset + done
        self.written.add(name)

    def close(self) -> list[str]:
        """Close the shards, write the index of a sharded model; returns the names never written."""
        with _disk_errors(self.folder, self.total_bytes):
            for fd in self.fds:
                os.fsync(fd)
                os.close(fd)
            self.fds = []
            if len(self.files) > 1:
                index = {"metadata": {"total_size": sum(n for _, _, n in self.where.values())},
                         "weight_map": {name: self.files[shard].name for name, (shard, _, _) in self.where.items()}}
                (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return [name for name in self.where if name not in self.written]

    def abort(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def _nbytes(shape: list[int], dtype: torch.dtype) -> int:
    count = 1
    for dim in shape:
        count *= int(dim)
    return count * dtype.itemsize


def _no_space(folder: Path, need: int, free: int | None = None) -> PrunekitError:
    have = f", {_size(free)} free" if free is not None else ""
    return PrunekitError(f"not enough disk space for the pruned model in '{folder.parent}' ({_size(need)} "
                         f"needed{have}): free some space or choose another --out; nothing was written")


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.2f} MB"


@contextmanager
def _disk_errors(folder: Path, need: int) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise _no_space(folder, need) from exc
        raise PrunekitError(f"cannot write the pruned model into '{folder.parent}' ({exc.strerror or exc}): "
                            "check the output folder; nothing was written") from exc


class Onloader:
    """A block placement (see :mod:`prunekit.calibration.placement`) that reads weights from files and writes them out.

    ``model`` is a skeleton from :func:`build_skeleton`; ``folder`` holds its safetensors weights. Raises
    :class:`OnloadUnsupported` when the model's parameters cannot be matched to the files' tensors.
    """

    def __init__(self, model: nn.Module, folder: Path) -> None:
        from prunekit.adapters import get_adapter

        self.model = model
        if len(get_adapter(model).stacks()) > 1:  # the decoder's capture runs the whole (pruned) encoder
            raise OnloadUnsupported("an encoder-decoder model runs its encoder again to calibrate its decoder")
        self.files = WeightFiles(folder)
        self.writer: ShardWriter | None = None
        self.groups = _groups(model)
        self.loaded: set[str] = set()  # groups whose weights are in memory now
        self.peak_blocks = 0
        prefix = getattr(model, "base_model_prefix", "") or ""
        missing = []
        for group in self.groups.values():
            group.source = _source_key(group, self.files.entries, prefix)
            if group.source is None:
                missing.append(group.name)
        if missing:
            raise OnloadUnsupported(f"the model's parameter {missing[0]} is not in the weight files under that "
                                    f"name ({len(missing)} such)")
        self.block_groups: dict[int, list[str]] = {}
        self.blocks: list[nn.Module] = []
        all_blocks = get_adapter(model).all_blocks()
        block_names = {name for name, _ in all_blocks}
        owner: dict[str, set[str]] = {}  # group -> the blocks (or '' for outside) holding it
        for group in self.groups.values():
            for slot, _, _ in group.slots:
                owner.setdefault(group.name, set()).add(_block_of(slot, block_names))
        for block_name, block in all_blocks:
            self.block_groups[id(block)] = [name for name, places in owner.items() if places == {block_name}]
            self.blocks.append(block)
        shared = [name for name, places in owner.items() if len(places) > 1]
        if shared:
            raise OnloadUnsupported(f"parameter {shared[0]} is shared between a block and another part of the model")
        inside = {name for names in self.block_groups.values() for name in names}
        self.outside_groups = [name for name in self.groups if name not in inside]
        self._load_buffers()

    def _load_buffers(self) -> None:
        """Persistent buffers stored in the files (few and small) are read once, as from_pretrained would."""
        state = self.model.state_dict()
        wanted = [name for name in state if name not in self.groups and name in self.files.entries]
        if not wanted:
            return
        values = self.files.read(wanted)
        with torch.no_grad():
            for name, value in values.items():
                buffer = self.model.get_buffer(name)
                buffer.copy_(value.to(buffer.dtype))

    # ---- output ---------------------------------------------------------------------------------
    def output_tensors(self) -> list[tuple[str, list[int], torch.dtype]]:
        """(name, shape, dtype) of every tensor a save_pretrained of the model would write, in its order."""
        out: list[tuple[str, list[int], torch.dtype]] = []
        for name, tensor in _saved_state(self.model).items():
            out.append((name, list(tensor.shape), tensor.dtype))
        return out

    def open_output(self, folder: Path) -> ShardWriter:
        """Plan and create the output shards in ``folder`` (the temporary output folder)."""
        self.writer = ShardWriter(folder, self.output_tensors())
        self.writer.open()
        return self.writer

    def finish(self) -> None:
        """Write what was never written (unchanged blocks, buffers) and close the shards."""
        writer = self.writer
        if writer is None:
            return
        state = _saved_state(self.model)
        rest = [name for name in writer.where if name not in writer.written]
        for name in rest:
            if name in self.groups:
                group = self.groups[name]
                assert group.source is not None
                value = self.files.read([group.source])[group.source]
                writer.write(name, value.to(group.parameter.dtype))
            else:
                writer.write(name, state[name])
        missing = writer.close()
        if missing:  # pragma: no cover - every planned name is written above
            raise RuntimeError(f"output tensors never written: {missing[:3]}")

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()

    # ---- placement ------------------------------------------------------------------------------
    def _load(self, names: list[str], device: torch.device) -> None:
        groups = [self.groups[name] for name in names if name not in self.loaded]
        values = self.files.read([g.source for g in groups if g.source is not None])
        with torch.no_grad():
            for group in groups:
                assert group.source is not None
                value = values[group.source]
                target = group.parameter
                if list(value.shape) != list(target.shape):
                    raise PrunekitError(f"'{self.files.folder}': {group.source} has shape {list(value.shape)}, the "
                                        f"model's config says {list(target.shape)}: the folder's config and weights "
                                        "do not match")
                group.assign(value.to(device=device, dtype=target.dtype))
                self.loaded.add(group.name)

    def _free(self, names: list[str], write: bool) -> None:
        for name in names:
            if name not in self.loaded:
                continue
            group = self.groups[name]
            if write and self.writer is not None and name in self.writer.where:
                self.writer.write(name, group.parameter)
            group.free()
            self.loaded.discard(name)

    def materialised_blocks(self) -> int:
        """How many blocks have weights in memory now (for tests and reports)."""
        return sum(1 for block in self.blocks if any(p.device.type != "meta" for p in block.parameters()))

    @contextmanager
    def outside(self, model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> Iterator[None]:
        self._load(self.outside_groups, device)
        try:
            yield
        finally:
            self._free(self.outside_groups, write=True)  # unchanged: written as read

    def enter(self, block: nn.Module, device: torch.device) -> None:
        self._load(self.block_groups[id(block)], device)
        self.peak_blocks = max(self.peak_blocks, self.materialised_blocks())

    def leave(self, block: nn.Module, changed: bool) -> None:
        self._free(self.block_groups[id(block)], write=changed)
        release_freed_memory()  # this block's weights and transient buffers: resident memory stays bounded


def _block_of(slot: str, blocks: set[str]) -> str:
    """The name of the block holding the parameter ``slot`` ('' when outside every block)."""
    parts = slot.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:depth])
        if prefix in blocks:
            return prefix
    return ""


def _saved_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict save_pretrained writes: tied duplicates removed (meta tensors for parameters)."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = model.state_dict()
    ignored: list[str] = list(getattr(model, "_keys_to_ignore_on_save", None) or [])
    for key in ignored:
        state.pop(key, None)
    return remove_tied_weights_from_state_dict(state, model)  # type: ignore[arg-type]


def _groups(model: nn.Module) -> dict[str, _Group]:
    """Every parameter once, under the name save_pretrained keeps for it, with all the places that hold it."""
    saved = _saved_state(model)
    slots: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attr, param in module._parameters.items():
            if param is not None:
                full = f"{module_name}.{attr}" if module_name else attr
                slots.setdefault(id(param), []).append((full, module, attr))
    groups: dict[str, _Group] = {}
    for holders in slots.values():
        kept = [full for full, _, _ in holders if full in saved]
        if len(set(kept)) != 1:
            raise OnloadUnsupported(f"parameter {holders[0][0]} is saved under {len(set(kept))} names")
        groups[kept[0]] = _Group(kept[0], holders)
    return groups


def _source_key(group: _Group, entries: dict[str, _Entry], prefix: str) -> str | None:
    """The files' name of a parameter: its own, a tied twin's, or either with the base prefix added or removed."""
    for full, _, _ in [(group.name, None, None), *group.slots]:
        candidates = [full]
        if prefix and full.startswith(prefix + "."):
            candidates.append(full[len(prefix) + 1:])
        elif prefix:
            candidates.append(f"{prefix}.{full}")
        for candidate in candidates:
            if candidate in entries:
                return candidate
    return None

