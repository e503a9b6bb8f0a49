"""The built-in ``austen`` text set: Jane Austen's six novels from Debian's ``r-cran-janeaustenr``.

The package ships the novels as an R lazy-load database (``data/Rdata.rdx`` + ``Rdata.rdb``):
the ``.rdx`` is a gzip'ed R serialisation of an index whose ``variables`` entry maps each object
name to an ``(offset, length)`` pair in the ``.rdb``; each ``.rdb`` chunk is a 4-byte big-endian
uncompressed length followed by a zlib stream holding one serialised R character vector (one
element per line of the novel). :func:`read_r_lazyload` reads that format with the ``rdata``
package; the rest of this module only consumes its ``{name: lines}`` result.
"""

from __future__ import annotations

import bz2
import gzip
import io
import logging
import lzma
import shutil
import subprocess
import tarfile
import tempfile
import warnings
import zlib
from pathlib import Path
from typing import Any

from prunekit.data.core import TextData, split_text_tail, write_prepared
from prunekit.errors import PrunekitError, UnreachableError

log = logging.getLogger(__name__)

PACKAGE = "r-cran-janeaustenr"
PACKAGE_VERSION = "1.0.0-1"  # the version prunekit was built against (bookworm); a newer one is recorded as found
NOVELS = {"sensesensibility": "Sense and Sensibility", "prideprejudice": "Pride and Prejudice",
          "mansfieldpark": "Mansfield Park", "emma": "Emma", "northangerabbey": "Northanger Abbey",
          "persuasion": "Persuasion"}
TRAIN_NOVELS = ["emma", "mansfieldpark", "prideprejudice", "sensesensibility"]
EVAL_NOVELS = ["persuasion"]
EXTRA_NOVELS = ["northangerabbey"]
NOVEL_SEPARATOR = "\n\n\n"  # two blank lines between concatenated novels

DESCRIPTION = (
    "Jane Austen's six novels (Debian r-cran-janeaustenr 1.0.0-1). calibration = train = Emma, Mansfield Park, "
    "Pride and Prejudice, Sense and Sensibility joined in that order by blank lines (calibration windows are "
    "drawn from it at random by seed); eval = Persuasion; extra = Northanger Abbey (unused by default). "
    "austen:NOVEL (e.g. austen:emma) gives one novel, its last ~10% as eval."
)
FROM_HINT = "download the .deb elsewhere and run `prunekit data prepare austen --from PATH.deb`"


# ---------------------------------------------------------------------------------------------
# R lazy-load database reader


def _r_parse(raw: bytes) -> Any:
    import rdata

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unknown file type")
        return rdata.parser.parse_data(raw)


def _r_unserialize(raw: bytes) -> Any:
    import rdata

    return rdata.conversion.convert(_r_parse(raw))


def _r_strings(raw: bytes) -> list[str] | None:
    """The strings of a serialised R character vector (NA -> ""); None for any other R object."""
    import rdata

    parsed = _r_parse(raw)
    if parsed.object.info.type != rdata.parser.RObjectType.STR:
        return None
    return ["" if x is None else str(x) for x in rdata.conversion.convert(parsed).tolist()]


def _decompress_chunk(blob: bytes, compressed: int) -> bytes:
    """Undo R's lazy-load chunk compression: 4-byte length, then zlib (1) or a typed stream (2, 3)."""
    if compressed == 1:
        return zlib.decompress(blob[4:])
    kind, body = blob[4:5], blob[5:]
    if kind == b"Z":
        return zlib.decompress(body)
    if kind == b"2":
        return bz2.decompress(body)
    if kind == b"X":
        return lzma.decompress(body, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": 9}])
    if kind == b"0":
        return body
    raise ValueError(f"unknown chunk compression {kind!r}")


def read_r_lazyload(base_path: str | Path) -> dict[str, list[str]]:
    """Read the character vectors of an R lazy-load database ``base_path``.rdx/.rdb.

    Returns ``{object name: list of strings}``; R ``NA`` strings become ``""`` and objects that are
    not character vectors are skipped. Raises PrunekitError when the files are missing or damaged.
    """
    base = Path(base_path)
    rdx, rdb = base.with_name(base.name + ".rdx"), base.with_name(base.name + ".rdb")
    try:
        index = _r_unserialize(gzip.decompress(rdx.read_bytes()))
        data = rdb.read_bytes()
        variables = index["variables"]
        compressed = int(index["compressed"][0]) if "compressed" in index else 1
        out: dict[str, list[str]] = {}
        for name, (offset, length) in variables.items():
            strings = _r_strings(_decompress_chunk(data[int(offset):int(offset) + int(length)], compressed))
            if strings is not None:
                out[str(name)] = strings
        return out
    except FileNotFoundError as exc:
        raise PrunekitError(f"R lazy-load database '{base}' not found ({exc.filename}): give the folder that "
                            "holds Rdata.rdx and Rdata.rdb, or the .deb") from exc
    except Exception as exc:  # rdata raises many kinds of errors on damaged input
        raise PrunekitError(f"cannot read R lazy-load database '{base}' ({type(exc).__name__}: {exc}): "
                            f"the files are damaged or not an R data base; {FROM_HINT}") from exc


# ---------------------------------------------------------------------------------------------
# Getting the .deb and its files


def download_deb(dest: Path) -> Path:
    """``apt-get download r-cran-janeaustenr`` into ``dest``; UnreachableError when apt cannot fetch it."""
    try:
        proc = subprocess.run(["apt-get", "download", PACKAGE], cwd=dest, capture_output=True, text=True,
                              timeout=600)
    except FileNotFoundError as exc:
        raise UnreachableError(f"cannot download {PACKAGE} (apt-get not found): {FROM_HINT}") from exc
    except subprocess.TimeoutExpired as exc:
        raise UnreachableError(f"cannot download {PACKAGE} (apt unreachable: timed out): {FROM_HINT}") from exc
    debs = sorted(dest.glob(f"{PACKAGE}_*.deb"))
    if proc.returncode != 0 or not debs:
        errors = [line for line in proc.stderr.splitlines() if line.startswith("E:")] or proc.stderr.splitlines()
        reason = errors[-1].strip() if errors else f"exit status {proc.returncode}"
        hint = "run `apt-get update` first, or " if "Unable to locate" in reason else ""
        raise UnreachableError(f"cannot download {PACKAGE} (apt unreachable: {reason}): {hint}{FROM_HINT}")
    return debs[-1]


def _ar_members(deb: Path) -> dict[str, bytes]:
    """The members of an ``ar`` archive (a .deb), read without external tools."""
    raw = deb.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise PrunekitError(f"'{deb}' is not a .deb (ar) archive: give the {PACKAGE} .deb file")
    members, pos = {}, 8
    while pos + 60 <= len(raw):
        header = raw[pos:pos + 60]
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        members[name] = raw[pos + 60:pos + 60 + size]
        pos += 60 + size + (size % 2)
    return members


def extract_deb(deb: Path, dest: Path) -> Path:
    """Unpack the .deb's files into ``dest`` (``dpkg-deb -x``, or Python ar+tar when dpkg is absent)."""
    dest.mkdir(parents=True, exist_ok=True)
    if shutil.which("dpkg-deb"):
        proc = subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], capture_output=True, text=True)
        if proc.returncode == 0:
            return dest
        log.info("dpkg-deb -x failed (%s); unpacking with Python", proc.stderr.strip())
    members = _ar_members(deb)
    data_name = next((n for n in members if n.startswith("data.tar")), None)
    if data_name is None:
        raise PrunekitError(f"'{deb}' has no data.tar member: give the {PACKAGE} .deb file")
    try:
        with tarfile.open(fileobj=io.BytesIO(members[data_name]), mode="r:*") as tar:
            for member in tar.getmembers():
                if member.isfile() and Path(member.name).name in ("Rdata.rdx", "Rdata.rdb"):
                    fobj = tar.extractfile(member)
                    if fobj is not None:
                        (dest / Path(member.name).name).write_bytes(fobj.read())
    except tarfile.TarError as exc:
        raise PrunekitError(f"cannot unpack {data_name} of '{deb}' ({exc}): install dpkg, or extract the .deb "
                            "yourself and pass the folder to --from") from exc
    return dest


def find_lazyload(folder: Path) -> Path:
    """The ``Rdata`` base path inside ``folder`` (searched recursively; janeaustenr's own copy preferred)."""
    found = sorted(folder.rglob("Rdata.rdx"), key=lambda p: ("janeaustenr" not in str(p), len(str(p))))
    if not found:
        raise PrunekitError(f"no Rdata.rdx found under '{folder}': give the {PACKAGE} .deb or the folder "
                            "that holds Rdata.rdx and Rdata.rdb")
    return found[0].with_suffix("")


def novels_from_source(source: str | Path | None) -> tuple[dict[str, str], str]:
    """Read the six novels (name -> text) from apt (``source=None``), a local .deb, or a folder.

    Returns the novels and a short description of where they came from.
    """
    with tempfile.TemporaryDirectory(prefix="prunekit-austen-") as tmpdir:
        tmp = Path(tmpdir)
        if source is None:
            deb = download_deb(tmp)
            origin = f"apt:{deb.name}"
            base = find_lazyload(extract_deb(deb, tmp / "x"))
        else:
            path = Path(source).expanduser()
            origin = f"file:{path.resolve()}"
            if not path.exists():
                raise PrunekitError(f"'{path}' does not exist: give the {PACKAGE} .deb or its extracted folder")
            if path.is_dir():
                base = find_lazyload(path)
            elif path.suffix in (".rdx", ".rdb"):
                base = path.with_suffix("")
            else:
                base = find_lazyload(extract_deb(path, tmp / "x"))
        objects = read_r_lazyload(base)
    missing = [n for n in NOVELS if n not in objects]
    if missing:
        raise PrunekitError(f"the R data base has no {', '.join(missing)} (found {', '.join(objects) or 'nothing'}):"
                            f" give the {PACKAGE} package data")
    novels = {n: "\n".join(objects[n]).strip("\n") for n in NOVELS}
    return novels, origin


def build_austen(novels: dict[str, str], description: str = DESCRIPTION) -> TextData:
    """The austen splits from the novel texts (see :data:`DESCRIPTION`)."""
    def join(names: list[str]) -> str:
        return NOVEL_SEPARATOR.join(novels[n] for n in names) + "\n"

    train = join(TRAIN_NOVELS)
    return TextData("austen", {"calibration": train, "train": train, "eval": join(EVAL_NOVELS),
                               "extra": join(EXTRA_NOVELS)}, description)


def prepare_austen(source: str | Path | None = None, overwrite: bool = False) -> Path:
    """Get the novels (apt, .deb or folder) and store the splits plus one file per novel in the cache."""
    novels, origin = novels_from_source(source)
    data = build_austen(novels)
    log.info("preparing austen from %s", origin)
    return write_prepared("austen", data, origin, overwrite=overwrite, aliases={"calibration": "train"},
                          files={f"novel-{n}.txt": text + "\n" for n, text in novels.items()},
                          extra={"package": PACKAGE, "package_version_expected": PACKAGE_VERSION})


def austen_novel(folder: Path, novel: str) -> TextData:
    """``austen:NOVEL`` from the prepared folder: one novel as the whole text, its last ~10% (at a line) as eval."""
    if novel not in NOVELS:
        raise PrunekitError(f"unknown novel '{novel}' for austen: use one of {', '.join(NOVELS)}")
    path = folder / f"novel-{novel}.txt"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PrunekitError(f"prepared austen in '{folder}' lacks {path.name}: run `prunekit data prepare austen "
                            "--force`") from exc
    head, tail = split_text_tail(text)
    return TextData(f"austen:{novel}", {"calibration": head, "train": head, "eval": tail},
                    f"{NOVELS[novel]} by Jane Austen (r-cran-janeaustenr); calibration = train = the first ~90%, "
                    "eval = the last ~10% (cut at a line boundary).")
