"""The built-in sentiment sets ``reviews``, ``tweets``, ``products`` and ``nyt``.

They are the human-rated snippets of Hutto & Gilbert (ICWSM 2014), shipped inside the PyPI source
distribution of ``vaderSentiment==3.3.2`` as ``additional_resources/hutto_ICWSM_2014.tar.gz``.
Each ``*_GroundTruth.txt`` holds CRLF lines ``id<TAB>mean_rating<TAB>text``. Label 1 (positive)
when the rating is > 0, 0 (negative) when < 0; zero ratings are dropped. The examples, in file
order, are shuffled with ``random.Random(1234)`` and cut 80/10/10 into train/validation/test
(validation and test get ``n // 10`` each). One download prepares all four sets.
"""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from prunekit.data.core import (
    SPLIT_SEED,
    ClassificationData,
    Example,
    folder_for,
    is_prepared,
    split_examples,
    write_prepared,
)
from prunekit.errors import PrunekitError, UnreachableError

log = logging.getLogger(__name__)

PYPI_SPEC = "vaderSentiment==3.3.2"
INNER_TARBALL = "hutto_ICWSM_2014.tar.gz"
FILES = {"reviews": "movieReviewSnippets_GroundTruth.txt", "tweets": "tweets_GroundTruth.txt",
         "products": "amazonReviewSnippets_GroundTruth.txt", "nyt": "nytEditorialSnippets_GroundTruth.txt"}
TITLES = {"reviews": "Movie-review snippets", "tweets": "Tweets", "products": "Amazon product-review snippets",
          "nyt": "New York Times editorial snippets"}
LABEL_NAMES = ["negative", "positive"]
# Counts of vaderSentiment 3.3.2 (rows, zero-rated rows dropped, train/validation/test).
COUNTS = {"reviews": (10605, 37, 8456, 1056, 1056), "tweets": (4200, 4, 3358, 419, 419),
          "products": (3708, 98, 2888, 361, 361), "nyt": (5190, 244, 3958, 494, 494)}


def describe(name: str, rows: int, dropped: int, train: int, validation: int, test: int) -> str:
    """The description of a sentiment set, with its exact counts."""
    return (f"{TITLES[name]} rated by people (Hutto & Gilbert, ICWSM 2014; from the {PYPI_SPEC} sdist), "
            f"binary sentiment negative/positive: {rows} rows, {dropped} neutral (rating 0) dropped, "
            f"shuffled with seed {SPLIT_SEED} and cut 80/10/10 into train {train} / validation {validation} / "
            f"test {test}.")


def static_description(name: str) -> str:
    """Description with the counts of the published files (shown before the set is prepared)."""
    return describe(name, *COUNTS[name])


def from_hint(name: str) -> str:
    return (f"download vaderSentiment-3.3.2.tar.gz elsewhere (pip download --no-deps --no-binary :all: "
            f"{PYPI_SPEC}) and run `prunekit data prepare {name} --from PATH`")


def download_sdist(dest: Path, name: str = "reviews") -> Path:
    """``pip download`` the vaderSentiment sdist into ``dest``; UnreachableError when PyPI cannot be reached."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--disable-pip-version-check",
           "--quiet", PYPI_SPEC, "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired as exc:
        raise UnreachableError(f"cannot download {PYPI_SPEC} (PyPI unreachable: timed out): {from_hint(name)}") from exc
    found = sorted(dest.glob("vaderSentiment-*.tar.gz")) or sorted(dest.glob("vadersentiment-*.tar.gz"))
    if proc.returncode != 0 or not found:
        lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit status {proc.returncode}"
        raise UnreachableError(f"cannot download {PYPI_SPEC} (PyPI unreachable: {reason}): {from_hint(name)}")
    return found[0]


def _from_tar(fileobj: io.BufferedIOBase | io.BytesIO, origin: str) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    inner: bytes | None = None
    try:
        with tarfile.open(fileobj=fileobj, mode="r:*") as tar:
            for member in tar.getmembers():
                base = Path(member.name).name
                if not member.isfile() or not (base in FILES.values() or base == INNER_TARBALL):
                    continue
                fobj = tar.extractfile(member)
                if fobj is None:
                    continue
                if base == INNER_TARBALL:
                    inner = fobj.read()
                else:
                    files[base] = fobj.read()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise PrunekitError(f"cannot read '{origin}' as a tar archive ({exc}): give the vaderSentiment sdist "
                            f"tar.gz, its {INNER_TARBALL}, or the extracted folder") from exc
    if not files and inner is not None:
        return _from_tar(io.BytesIO(inner), f"{origin}:{INNER_TARBALL}")
    return files


def collect_ground_truth(path: str | Path) -> dict[str, bytes]:
    """``{file name: bytes}`` of the GroundTruth files in a sdist tar.gz, the inner tarball, or a folder."""
    path = Path(path).expanduser()
    if not path.exists():
        raise PrunekitError(f"'{path}' does not exist: give the vaderSentiment sdist tar.gz, its {INNER_TARBALL}, "
                            "or the extracted folder")
    if path.is_dir():
        files = {p.name: p.read_bytes() for p in sorted(path.rglob("*_GroundTruth.txt")) if p.name in FILES.values()}
        if not files:
            inner = sorted(path.rglob(INNER_TARBALL))
            if inner:
                with inner[0].open("rb") as fh:
                    files = _from_tar(fh, str(inner[0]))
    else:
        with path.open("rb") as fh:
            files = _from_tar(fh, str(path))
    if not files:
        raise PrunekitError(f"no *_GroundTruth.txt files found in '{path}': give the vaderSentiment 3.3.2 sdist "
                            f"tar.gz, its {INNER_TARBALL}, or the extracted folder")
    return files


def parse_ground_truth(raw: bytes, origin: str) -> tuple[list[Example], int]:
    """Labelled examples (file order) and the number of zero-rated rows dropped."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PrunekitError(f"'{origin}' is not UTF-8 text ({exc}): give the original vaderSentiment file") from exc
    examples: list[Example] = []
    dropped = 0
    for lineno, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        parts = line.split("\t", 2)
        try:
            rating = float(parts[1])
            snippet = parts[2].strip()
        except (IndexError, ValueError) as exc:
            raise PrunekitError(f"line {lineno} of '{origin}' is not 'id<TAB>rating<TAB>text': "
                                "give the original vaderSentiment file") from exc
        if rating == 0:
            dropped += 1
            continue
        examples.append((snippet, 1 if rating > 0 else 0))
    if not examples:
        raise PrunekitError(f"'{origin}' holds no rated snippets: give the original vaderSentiment file")
    return examples, dropped


def build_set(name: str, raw: bytes) -> ClassificationData:
    """The ClassificationData of one sentiment set from the bytes of its GroundTruth file."""
    examples, dropped = parse_ground_truth(raw, FILES[name])
    splits = split_examples(examples)
    desc = describe(name, len(examples) + dropped, dropped, *(len(splits[s]) for s in ("train", "validation", "test")))
    return ClassificationData(name, splits, list(LABEL_NAMES), desc)


def prepare_vader(name: str, source: str | Path | None = None, overwrite: bool = False) -> Path:
    """Prepare ``name`` and the other sentiment sets (those not yet prepared, or all with ``overwrite``)."""
    with tempfile.TemporaryDirectory(prefix="prunekit-vader-") as tmpdir:
        if source is None:
            sdist = download_sdist(Path(tmpdir), name)
            origin = f"pypi:{sdist.name}"
        else:
            sdist = Path(source)
            origin = f"file:{Path(source).expanduser().resolve()}"
        files = collect_ground_truth(sdist)
    if FILES[name] not in files:
        raise PrunekitError(f"'{source}' has no {FILES[name]} (found {', '.join(sorted(files))}): give the full "
                            f"vaderSentiment 3.3.2 sdist")
    for other, fname in FILES.items():
        if fname not in files or (other != name and is_prepared(other) and not overwrite):
            continue
        log.info("preparing %s from %s", other, origin)
        write_prepared(other, build_set(other, files[fname]), origin, extra={"file": fname}, overwrite=overwrite)
    return folder_for(name)
