"""The built-in dataset registry and the public entry points ``load_data``, ``list_datasets``, ``prepare_dataset``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prunekit.data import austen, hub, local, vader
from prunekit.data.core import Data, TextData, folder_for, is_prepared, read_prepared, write_prepared
from prunekit.errors import PrunekitError


@dataclass(frozen=True)
class Builtin:
    """One built-in dataset: short name, kind (text/classification), where it comes from, description."""

    name: str
    kind: str
    source: str
    description: str


def _builtins() -> dict[str, Builtin]:
    out = {"austen": Builtin("austen", "text", f"apt:{austen.PACKAGE}", austen.DESCRIPTION)}
    for name in vader.FILES:
        out[name] = Builtin(name, "classification", f"pypi:{vader.PYPI_SPEC}", vader.static_description(name))
    for name, spec in hub.HUB_TEXT.items():
        out[name] = Builtin(name, "text", f"hub:{spec['repo']}:{spec['config']}", spec["description"])
    out["c4"] = Builtin("c4", "text", f"hub:{hub.C4_REPO}", hub.C4_DESCRIPTION)
    for task in hub.GLUE:
        out[f"glue/{task}"] = Builtin(f"glue/{task}", "classification", f"hub:{hub.GLUE_REPO}:{task}",
                                      hub.glue_description(task))
    return out


BUILTINS = _builtins()


def _unknown(name: str) -> PrunekitError:
    hint = ""
    if name and Path(name).expanduser().exists():
        hint = f" (for the local file write text:{name}, csv:{name} or jsonl:{name})"
    return PrunekitError(f"unknown dataset '{name}'{hint}: use one of {', '.join(BUILTINS)}, text:PATH, csv:PATH, "
                         "jsonl:PATH, or a hub name owner/name[:config]")


def prepare_dataset(name: str, source: str | Path | None = None, force: bool = False) -> Path:
    """Prepare the built-in dataset ``name`` into ``cache_dir()/data/`` and return its folder.

    Idempotent: an already prepared set is returned as is unless ``force``. ``source`` replaces the
    download with a local copy: for ``austen`` the r-cran-janeaustenr .deb or a folder holding
    Rdata.rdx/.rdb; for ``reviews``/``tweets``/``products``/``nyt`` the vaderSentiment-3.3.2 sdist
    tar.gz, its inner hutto_ICWSM_2014.tar.gz, or an extracted folder (one source prepares all four).
    Hub sets (wikitext2, ptb, c4, glue/*) are downloaded with ``datasets``.
    """
    if name not in BUILTINS:
        if name.startswith(("text:", "csv:", "jsonl:")) or "/" in name:
            raise PrunekitError(f"'{name}' is not a built-in dataset, so there is nothing to prepare: it is read "
                                f"directly by load_data; built-in sets are {', '.join(BUILTINS)}")
        raise _unknown(name)
    if is_prepared(name) and not force:
        return folder_for(name)
    if name == "austen":
        return austen.prepare_austen(source, overwrite=force)
    if name in vader.FILES:
        return vader.prepare_vader(name, source, overwrite=force)
    if source is not None:
        raise PrunekitError(f"'{name}' comes from the Hugging Face hub and cannot be prepared from a file: drop "
                            "--from, or save the text and use text:PATH")
    data = hub.load_hub_builtin(name)
    aliases = {"calibration": "train"} if isinstance(data, TextData) and "calibration" in data.splits else None
    return write_prepared(name, data, BUILTINS[name].source, overwrite=force, aliases=aliases)


def load_data(name: str) -> Data:
    """Load a dataset by name.

    ``name`` is a built-in short name (see :func:`list_datasets`; prepared on first use),
    ``austen:NOVEL`` (one novel, e.g. ``austen:emma``), ``text:PATH``, ``csv:PATH``, ``jsonl:PATH``,
    or a Hugging Face hub name ``owner/name[:config]``.
    """
    name = name.strip()
    for form in ("csv", "jsonl"):
        if name.startswith(f"{form}:"):
            return local.load_table(name[len(form) + 1:], form)
    if name.startswith("text:"):
        return local.load_text(name[5:])
    if name.startswith("austen:"):
        novel = name.split(":", 1)[1]
        if novel not in austen.NOVELS:
            raise PrunekitError(f"unknown novel '{novel}' for austen: use one of {', '.join(austen.NOVELS)}")
        return austen.austen_novel(prepare_dataset("austen"), novel)
    if name in BUILTINS:
        prepare_dataset(name)
        return read_prepared(name)
    if "/" in name and not name.startswith(("/", ".", "~")):
        return hub.load_hub_generic(name)
    raise _unknown(name)


def list_datasets() -> list[dict]:
    """The built-in datasets: dicts with name, kind, source, prepared (bool), path and description."""
    return [{"name": b.name, "kind": b.kind, "source": b.source, "prepared": is_prepared(b.name),
             "path": str(folder_for(b.name)), "description": b.description} for b in BUILTINS.values()]
