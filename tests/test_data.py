"""Offline tests of prunekit.data (no apt, pip or hub access); PRUNEKIT_CACHE points at a temporary folder."""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import struct
import subprocess
import tarfile
import time
import zlib
from pathlib import Path

import pytest
import torch

from prunekit.data import (
    ClassificationData,
    TextData,
    calibration_batch,
    eval_tokens,
    hub,
    list_datasets,
    load_data,
    prepare_dataset,
    read_r_lazyload,
    vader,
)
from prunekit.data import austen as austen_mod
from prunekit.errors import PrunekitError, UnreachableError

REAL_CACHE = Path(os.environ.get("PRUNEKIT_CACHE") or Path.home() / ".cache" / "prunekit")
REAL_DEB = os.environ.get("PRUNEKIT_AUSTEN_DEB", "")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "cache"))


# --- A tiny tokenizer (word level, trained here) -- no downloads ---
@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(50)]
    core = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.train_from_iterator([" ".join(words)], trainers.WordLevelTrainer(special_tokens=["[UNK]", "[BOS]"]))
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="[BOS]", unk_token="[UNK]", model_max_length=16)


def words(n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return "\n".join(" ".join(f"w{rng.randrange(50)}" for _ in range(10)) for _ in range(n // 10))


# --- Hand-made R lazy-load database (XDR serialisation, format version 2) ---
def _i(v: int) -> bytes:
    return struct.pack(">i", v)


def _char(s: str | None) -> bytes:
    if s is None:
        return _i(9) + _i(-1)  # NA_STRING
    b = s.encode("utf-8")
    return _i((8 << 12) | 9) + _i(len(b)) + b  # CHARSXP flagged UTF-8


def _strs(items: list[str | None]) -> bytes:
    return _i(16) + _i(len(items)) + b"".join(_char(s) for s in items)


def _named(pairs: list[tuple[str, bytes]]) -> bytes:
    """A VECSXP with a names attribute (attribute pairlist: LISTSXP with tag 'names')."""
    return (_i(19 | 0x200) + _i(len(pairs)) + b"".join(v for _, v in pairs)
            + _i(2 | 0x400) + _i(1) + _char("names") + _strs([k for k, _ in pairs]) + _i(254))


def _ser(body: bytes) -> bytes:
    return b"X\n" + _i(2) + _i(0x040201) + _i(0x020300) + body


def write_lazyload(folder: Path, objects: dict[str, bytes]) -> Path:
    """Write Rdata.rdx/.rdb holding the serialised ``objects``; returns the base path."""
    rdb, index = b"", []
    for name, body in objects.items():
        raw = _ser(body)
        chunk = struct.pack(">I", len(raw)) + zlib.compress(raw)
        index.append((name, _i(13) + _i(2) + _i(len(rdb)) + _i(len(chunk))))
        rdb += chunk
    rdx = _ser(_named([("variables", _named(index)), ("references", _i(19) + _i(0)),
                       ("compressed", _i(10) + _i(1) + _i(1))]))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "Rdata.rdx").write_bytes(gzip.compress(rdx))
    (folder / "Rdata.rdb").write_bytes(rdb)
    return folder / "Rdata"


def fake_novels() -> dict[str, list[str | None]]:
    out: dict[str, list[str | None]] = {}
    for key, title in austen_mod.NOVELS.items():
        lines: list[str | None] = [title, "", "by Jane Austen", ""]
        out[key] = lines + [f"{title} line {i} café" for i in range(30)] + [""]
    return out


def fake_austen_folder(root: Path) -> Path:
    folder = root / "usr/lib/R/site-library/janeaustenr/data"
    write_lazyload(folder, {k: _strs(v) for k, v in fake_novels().items()})
    return root


def test_read_r_lazyload(tmp_path):
    base = write_lazyload(tmp_path / "ok", {"a": _strs(["x", None, "ünï"]), "n": _i(13) + _i(1) + _i(5),
                                            "b": _strs([])})
    assert read_r_lazyload(base) == {"a": ["x", "", "ünï"], "b": []}  # NA -> "", non-strings skipped
    with pytest.raises(PrunekitError, match="not found"):
        read_r_lazyload(tmp_path / "Rdata")
    (tmp_path / "Rdata.rdx").write_bytes(b"garbage")
    (tmp_path / "Rdata.rdb").write_bytes(b"")
    with pytest.raises(PrunekitError, match="cannot read R lazy-load"):
        read_r_lazyload(tmp_path / "Rdata")


def _ar(members: list[tuple[str, bytes]]) -> bytes:
    out = b"!<arch>\n"
    for name, data in members:
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode() + data
        out += b"\n" if len(data) % 2 else b""
    return out


def _tar(files: dict[str, bytes], mode: str = "w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:  # type: ignore[call-overload]
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def fake_deb(tmp_path: Path) -> Path:
    src = fake_austen_folder(tmp_path / "src")
    files = {f"./{p.relative_to(src)}": p.read_bytes() for p in src.rglob("Rdata.*")}
    deb = tmp_path / "r-cran-janeaustenr_1.0.0-1_all.deb"
    deb.write_bytes(_ar([("debian-binary", b"2.0\n"), ("control.tar.xz", _tar({"./control": b"Package: x\n"}, "w:xz")),
                         ("data.tar.xz", _tar(files, "w:xz"))]))
    return deb


def check_austen(data: TextData | ClassificationData) -> None:
    assert isinstance(data, TextData) and list(data.splits) == ["calibration", "train", "eval", "extra"]
    assert data.splits["calibration"] == data.splits["train"]
    assert data.splits["train"].startswith("Emma\n\nby Jane Austen")
    order = [data.splits["train"].index(f"\n{t}\n") if i else 0
             for i, t in enumerate(["Emma", "Mansfield Park", "Pride and Prejudice", "Sense and Sensibility"])]
    assert order == sorted(order)
    assert data.splits["eval"].startswith("Persuasion\n") and "café" in data.splits["eval"]
    assert data.splits["extra"].startswith("Northanger Abbey")
    assert "Persuasion" not in data.splits["train"]


@pytest.mark.parametrize("use_dpkg", [True, False])
def test_austen_from_deb(tmp_path, monkeypatch, use_dpkg):
    deb = fake_deb(tmp_path)
    if not use_dpkg:
        monkeypatch.setattr(austen_mod.shutil, "which", lambda name: None)
    folder = prepare_dataset("austen", source=deb)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["source"].startswith("file:") and manifest["counts"]["eval"]["lines"] == 34
    check_austen(load_data("austen"))
    assert prepare_dataset("austen") == folder  # idempotent, no download
    emma = load_data("austen:emma")
    assert emma.splits["train"].startswith("Emma") and emma.splits["eval"].endswith("line 29 café\n")
    with pytest.raises(PrunekitError, match="unknown novel 'nope'.*persuasion"):
        load_data("austen:nope")


def test_austen_from_folder_and_rdx(tmp_path):
    root = fake_austen_folder(tmp_path / "x")
    prepare_dataset("austen", source=root)
    check_austen(first := load_data("austen"))
    prepare_dataset("austen", source=next(root.rglob("Rdata.rdx")), force=True)
    assert load_data("austen") == first


def test_austen_bad_sources(tmp_path):
    with pytest.raises(PrunekitError, match="does not exist"):
        prepare_dataset("austen", source=tmp_path / "missing.deb")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrunekitError, match="no Rdata.rdx"):
        prepare_dataset("austen", source=tmp_path / "empty")
    write_lazyload(tmp_path / "partial", {"emma": _strs(["Emma"])})
    with pytest.raises(PrunekitError, match="has no sensesensibility, prideprejudice, mansfieldpark.*found emma"):
        prepare_dataset("austen", source=tmp_path / "partial")
    assert not (tmp_path / "cache" / "data" / "austen").exists()  # nothing half-prepared is left


def test_austen_apt_unreachable(monkeypatch):
    monkeypatch.setattr(austen_mod.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 100, "", f"W: x\nE: Failed to fetch for {' '.join(cmd)}\n"))
    with pytest.raises(UnreachableError, match=r"cannot download r-cran-janeaustenr \(apt unreachable: E: Failed "
                                               r"to fetch for apt-get download r-cran-janeaustenr\).*--from PATH\.deb"):
        prepare_dataset("austen")


# --- vaderSentiment sets from a hand-made sdist ---
def ground_truth(n: int, prefix: str) -> bytes:
    ratings = [1.5, -0.7, 0.0, 2.25, -3.0]
    lines = [f"{i}_1\t{ratings[i % 5]}\t {prefix} snippet {i}\twith tab " for i in range(n)]
    return ("\r\n".join(lines)).encode("utf-8")  # CRLF, no newline after the last line


def fake_sdist(tmp_path: Path) -> tuple[Path, bytes]:
    inner = _tar({f"hutto_ICWSM_2014/{fname}": ground_truth(50 + 10 * i, name)
                  for i, (name, fname) in enumerate(vader.FILES.items())}
                 | {"hutto_ICWSM_2014/_README_.txt": b"readme"})
    outer = tmp_path / "vaderSentiment-3.3.2.tar.gz"
    outer.write_bytes(_tar({"vaderSentiment-3.3.2/setup.py": b"",
                            "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz": inner}))
    return outer, inner


def test_reviews_from_sdist(tmp_path):
    outer, _ = fake_sdist(tmp_path)
    prepare_dataset("reviews", source=outer)
    data = load_data("reviews")
    assert isinstance(data, ClassificationData)
    assert data.label_names == ["negative", "positive"] and data.num_labels == 2
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 32, "validation": 4, "test": 4}  # 50 - 10 zeros
    everything = [ex for split in data.splits.values() for ex in split]
    assert all(not t.startswith(" ") and t.endswith("with tab") and "\r" not in t for t, _ in everything)
    by_index = {int(t.split()[2]): y for t, y in everything}
    assert all(i % 5 != 2 for i in by_index)
    assert all(y == (1 if i % 5 in (0, 3) else 0) for i, y in by_index.items())
    assert "50 rows, 10 neutral (rating 0) dropped" in data.description
    # one download prepares the other three sets as well
    listed = {d["name"]: d for d in list_datasets()}
    assert all(listed[n]["prepared"] for n in ("reviews", "tweets", "products", "nyt"))
    assert listed["tweets"]["kind"] == "classification" and not listed["austen"]["prepared"]
    assert len(load_data("nyt").splits["train"]) == 52  # 80 rows - 16 zeros = 64, minus 6 validation and 6 test


def test_reviews_split_is_deterministic(tmp_path, monkeypatch):
    outer, inner = fake_sdist(tmp_path)
    prepare_dataset("reviews", source=outer)
    first = load_data("reviews").splits
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "cache2"))
    (tmp_path / "inner.tar.gz").write_bytes(inner)
    prepare_dataset("reviews", source=tmp_path / "inner.tar.gz")
    assert load_data("reviews").splits == first
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "cache3"))
    folder = tmp_path / "extracted" / "hutto_ICWSM_2014"
    folder.mkdir(parents=True)
    (folder / "movieReviewSnippets_GroundTruth.txt").write_bytes(ground_truth(50, "reviews"))
    prepare_dataset("reviews", source=tmp_path / "extracted")
    assert load_data("reviews").splits == first


def test_reviews_bad_sources(tmp_path, monkeypatch):
    (tmp_path / "junk.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(PrunekitError, match="cannot read .* as a tar archive"):
        prepare_dataset("reviews", source=tmp_path / "junk.tar.gz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrunekitError, match="no \\*_GroundTruth.txt"):
        prepare_dataset("reviews", source=tmp_path / "empty")
    (tmp_path / "bad" / "h").mkdir(parents=True)
    (tmp_path / "bad" / "h" / "movieReviewSnippets_GroundTruth.txt").write_text("1\tnot-a-number\ttext\n")
    with pytest.raises(PrunekitError, match="line 1 of .*is not 'id<TAB>rating<TAB>text'"):
        prepare_dataset("reviews", source=tmp_path / "bad")

    monkeypatch.setattr(vader.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 1, "", "ERROR: Could not find a version (no network)\n"))
    with pytest.raises(UnreachableError, match=r"PyPI unreachable.*prunekit data prepare tweets --from PATH"):
        prepare_dataset("tweets")


# --- Local files ---
def test_text_file_and_folder(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("".join(f"line {i} " + "x" * 20 + "\n" for i in range(100)))
    data = load_data(f"text:{path}")
    assert isinstance(data, TextData) and data.name == f"text:{path}"
    assert data.splits["calibration"] == data.splits["train"]
    assert data.splits["eval"].startswith("line 90 ") or data.splits["eval"].startswith("line 89 ")
    assert data.splits["train"] + "\n" + data.splits["eval"] == path.read_text()
    (folder := tmp_path / "many").mkdir()
    for fname, text in {"b.txt": "second\n" * 50, "a.txt": "first\n" * 50, "skip.md": "ignored"}.items():
        (folder / fname).write_text(text)
    data = load_data(f"text:{folder}")
    assert data.splits["train"].startswith("first") and data.splits["eval"].rstrip().endswith("second")
    assert "ignored" not in data.splits["train"] + data.splits["eval"]


def test_csv_and_jsonl(tmp_path):
    rows = [(f"text {i}, with comma", ["bad", "good", "meh"][i % 3]) for i in range(30)]
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("text,label\n" + "".join(f'"{t}",{y}\n' for t, y in rows))
    data = load_data(f"csv:{csv_path}")
    assert isinstance(data, ClassificationData)
    assert data.label_names == ["bad", "good", "meh"]
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 24, "validation": 3, "test": 3}
    assert sorted(t for s in data.splits.values() for t, _ in s) == sorted(t for t, _ in rows)
    assert all(data.label_names[y] == dict(rows)[t] for s in data.splits.values() for t, y in s)
    assert load_data(f"csv:{csv_path}").splits == data.splits  # seeded
    jl = tmp_path / "d.jsonl"
    recs = [{"text": "a", "text_pair": "b", "label": 1, "split": "train"},
            {"text": "c", "text_pair": "d", "label": 0, "split": "dev"},
            {"text": "e", "text_pair": "f", "label": "2", "split": "test"}]
    jl.write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    data = load_data(f"jsonl:{jl}")
    assert data.splits == {"train": [(("a", "b"), 1)], "validation": [(("c", "d"), 0)], "test": [(("e", "f"), 2)]}
    assert data.label_names == ["0", "1", "2"]
    jl = tmp_path / "t.jsonl"  # text only -> a text set
    jl.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(40)))
    data = load_data(f"jsonl:{jl}")
    assert isinstance(data, TextData) and data.splits["train"].startswith("row 0\nrow 1\n")
    assert data.splits["eval"].endswith("row 39")


@pytest.mark.parametrize("form, fname, content, match", [
    ("text", "nope.txt", None, "does not exist"),
    ("text", "empty.txt", b" \n", "holds no text"),
    ("text", "bin.txt", b"\xff\xfe\x00\x81binary", "is not UTF-8 text"),
    ("text", "folder", "dir", "has no .txt files"),
    ("csv", "e.csv", b"", "is empty"),
    ("csv", "cols.csv", b"sentence,target\nhi,1\n", "has columns sentence, target but needs 'text' and 'label'"),
    ("csv", "split.csv", b"text,label,split\na,0,train\nb,1,holdout\n", "split 'holdout': use train, validation"),
    ("csv", "folder", "dir", "is a folder"),
    ("jsonl", "bad.jsonl", b'{"text": "a", "label": 1}\n{oops\n', "line 2 of .* is not JSON"),
    ("jsonl", "nolabel.jsonl", b'{"text": "a", "label": 1}\n{"text": "b"}\n', "line 2 of .* has no label"),
    ("jsonl", "neg.jsonl", b'{"text": "a", "label": -1}\n', "negative label -1"),
    ("jsonl", "missing.jsonl", None, "does not exist"),
])
def test_local_errors(tmp_path, form, fname, content, match):
    path = tmp_path / fname
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(PrunekitError, match=match):
        load_data(f"{form}:{path}")


def test_unknown_names(tmp_path):
    with pytest.raises(PrunekitError, match=r"unknown dataset 'nope': use one of austen, reviews.*text:PATH, csv:PATH"
                                            r", jsonl:PATH"):
        load_data("nope")
    with pytest.raises(PrunekitError, match="needs a path"):
        load_data("text:")
    with pytest.raises(PrunekitError, match="nothing to prepare"):
        prepare_dataset("text:/x.txt")
    with pytest.raises(PrunekitError, match="unknown dataset"):
        prepare_dataset("nope")
    with pytest.raises(PrunekitError, match="cannot be prepared from a file"):
        prepare_dataset("wikitext2", source=tmp_path)


def test_damaged_cache(tmp_path):
    folder = tmp_path / "cache" / "data" / "reviews"
    folder.mkdir(parents=True)
    (folder / "stale.jsonl").write_text("left over")
    outer, _ = fake_sdist(tmp_path)
    prepare_dataset("reviews", source=outer)  # a folder without manifest is replaced
    assert not (folder / "stale.jsonl").exists()
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(PrunekitError, match="damaged.*prunekit data prepare reviews --force"):
        load_data("reviews")
    prepare_dataset("reviews", source=outer, force=True)
    assert len(load_data("reviews").splits["train"]) == 32


# --- Tokenisation ---
def test_calibration_batch(tok):
    data = TextData("toy", {"calibration": words(2000), "eval": words(300, seed=1)})
    batch = calibration_batch(tok, data, n_samples=8, seq_len=32, seed=3)
    assert batch.shape == (8, 32) and batch.dtype == torch.long
    assert torch.equal(batch, calibration_batch(tok, data, 8, 32, seed=3))
    assert not torch.equal(batch, calibration_batch(tok, data, 8, 32, seed=4))
    ids = eval_tokens(tok, data, split="calibration")
    assert ids.numel() == 2000 and int(ids.min()) >= 2  # no special tokens added
    stream = ids.tolist()
    for row in batch.tolist():  # every row is a contiguous window of the tokenised split
        assert any(stream[s:s + 32] == row for s in range(len(stream) - 31))


def test_calibration_batch_too_short(tok):
    data = TextData("toy", {"calibration": words(100)})
    with pytest.raises(PrunekitError, match=r"calibration split of 'toy' has 100 tokens, fewer than the 128 "
                                            r"requested: lower --calib-samples/--seq-len or give more text"):
        calibration_batch(tok, data, n_samples=4, seq_len=32)
    with pytest.raises(PrunekitError, match="fewer than the 101"):
        calibration_batch(tok, data, n_samples=1, seq_len=100)
    assert calibration_batch(tok, data, n_samples=1, seq_len=99).shape == (1, 99)
    with pytest.raises(PrunekitError, match="has no split 'train'"):
        calibration_batch(tok, data, 1, 8, split="train")


def test_eval_tokens(tok):
    data = TextData("toy", {"eval": words(300), "empty": ""})
    ids = eval_tokens(tok, data)
    assert ids.dim() == 1 and ids.numel() == 300
    assert torch.equal(eval_tokens(tok, data, max_tokens=50), ids[:50])
    with pytest.raises(PrunekitError, match="has no tokens"):
        eval_tokens(tok, data, split="empty")
    with pytest.raises(PrunekitError, match="is a classification set"):
        eval_tokens(tok, ClassificationData("c", {"train": [("a", 0)]}, ["x"]))  # type: ignore[arg-type]


# --- Hub conversions (in-memory datasets) and the offline error ---
def test_hub_text_conversion():
    from datasets import Dataset

    dsdict = {"train": Dataset.from_dict({"text": [" = A = \n", "", " b c \n"]}),
              "validation": Dataset.from_dict({"text": ["v\n"]}), "test": Dataset.from_dict({"text": ["t1\n", "t2\n"]})}
    data = hub.text_from_splits("wikitext2", dsdict, "text", "\n\n", "d")
    assert data.splits == {"calibration": " = A = \n\n\n\n\n b c \n", "train": " = A = \n\n\n\n\n b c \n",
                           "validation": "v\n", "eval": "t1\n\n\nt2\n"}
    c4 = hub.c4_from_docs([f"doc{i}" for i in range(10)], eval_docs=3, calib_docs=4)
    assert c4.splits["eval"] == "doc0\n\ndoc1\n\ndoc2" and c4.splits["train"] == "doc3\n\ndoc4\n\ndoc5\n\ndoc6"


def test_glue_conversion():
    from datasets import Dataset

    train = Dataset.from_dict({"sentence1": [f"a{i}" for i in range(20)], "sentence2": [f"b{i}" for i in range(20)],
                               "label": [i % 2 for i in range(20)], "idx": list(range(20))})
    dev = Dataset.from_dict({"sentence1": ["x", "y"], "sentence2": ["z", "w"], "label": [1, 0], "idx": [0, 1]})
    test = Dataset.from_dict({"sentence1": ["q"], "sentence2": ["r"], "label": [-1], "idx": [0]})
    data = hub.glue_from_hub("rte", {"train": train, "validation": dev, "test": test})
    assert data.name == "glue/rte" and data.label_names == ["entailment", "not_entailment"]
    assert len(data.splits["train"]) == 18 and len(data.splits["validation"]) == 2
    assert data.splits["test"] == [(("x", "z"), 1), (("y", "w"), 0)]
    assert sorted(data.splits["train"] + data.splits["validation"]) == sorted(
        ((f"a{i}", f"b{i}"), i % 2) for i in range(20))
    single = hub.glue_from_hub("sst2", {"train": Dataset.from_dict({"sentence": ["s"] * 10, "label": [1] * 10}),
                                        "validation": Dataset.from_dict({"sentence": ["t"], "label": [0]})})
    assert single.splits["test"] == [("t", 0)] and isinstance(single.splits["train"][0][0], str)


def test_generic_hub_conversion():
    from datasets import ClassLabel, Dataset, Features, Value

    feats = Features({"text": Value("string"), "label": ClassLabel(names=["neg", "pos"])})
    ds = Dataset.from_dict({"text": [f"t{i}" for i in range(20)], "label": [i % 2 for i in range(20)]}, features=feats)
    data = hub.generic_from_hub("me/set", {"train": ds})
    assert isinstance(data, ClassificationData) and data.label_names == ["neg", "pos"]
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 16, "validation": 2, "test": 2}
    text = hub.generic_from_hub("me/txt", {"train": Dataset.from_dict({"content": ["a", "b"]}),
                                           "validation": Dataset.from_dict({"content": ["c"]})})
    assert isinstance(text, TextData) and text.splits["eval"] == "c" and text.splits["train"] == "a\n\nb"
    with pytest.raises(PrunekitError, match="has columns foo but needs one of text"):
        hub.generic_from_hub("me/x", {"train": Dataset.from_dict({"foo": ["a"]})})


@pytest.mark.parametrize("name", ["wikitext2", "glue/sst2", "someone/some-set"])
def test_hub_offline_is_unreachable(name, tmp_path, monkeypatch):
    import datasets
    import huggingface_hub.constants as hf_constants

    for var, value in [("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("HF_HOME", str(tmp_path / "hf"))]:
        monkeypatch.setenv(var, value)
    # both libraries read these at import time, which may have happened before this test
    for module, attr, value in [(datasets.config, "HF_HUB_OFFLINE", True), (hf_constants, "HF_HUB_OFFLINE", True),
                                (datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf" / "datasets"),
                                (hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))]:
        monkeypatch.setattr(module, attr, value, raising=False)
    start = time.monotonic()
    with pytest.raises(UnreachableError, match=f"cannot reach the Hugging Face hub for dataset '{name}': connect"):
        load_data(name)
    assert time.monotonic() - start < 30
    assert not (tmp_path / "cache" / "data" / name.replace("/", "-")).exists()


# --- Real data (skipped unless a prepared austen or the real .deb is at hand) ---
@pytest.mark.real_data
@pytest.mark.skipif(not ((REAL_CACHE / "data" / "austen" / "manifest.json").is_file() or Path(REAL_DEB).is_file()),
                    reason="real austen not prepared (`prunekit data prepare austen`) and PRUNEKIT_AUSTEN_DEB unset")
def test_real_austen(tmp_path, monkeypatch):
    if Path(REAL_DEB).is_file():
        prepare_dataset("austen", source=REAL_DEB)
    else:
        monkeypatch.setenv("PRUNEKIT_CACHE", str(REAL_CACHE))
    folder = prepare_dataset("austen")
    manifest = json.loads((folder / "manifest.json").read_text())
    names = "emma mansfieldpark northangerabbey persuasion prideprejudice sensesensibility".split()
    assert sorted(manifest["files"]) == [f"novel-{n}.txt" for n in names]
    data = load_data("austen")
    assert data.splits["eval"].startswith("Persuasion")
    assert data.splits["train"].startswith("EMMA") and len(data.splits["train"]) > 3_000_000


def test_long_texts_are_tokenised_once_then_read_from_the_cache(tiny_tokenizer, monkeypatch) -> None:
    from prunekit.data import core

    text = " ".join(f"word{i % 97} and more text" for i in range(12_000))  # > TOKEN_CACHE_MIN_CHARS characters
    assert len(text) >= core.TOKEN_CACHE_MIN_CHARS
    expected = torch.as_tensor(tiny_tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    first = core.tokenize_text(tiny_tokenizer, text)
    assert torch.equal(first, expected)
    path = core._token_cache_path(tiny_tokenizer, text)
    assert path is not None and path.is_file()

    def refuse(*args, **kwargs):
        raise AssertionError("tokenised again instead of reading the cache")

    monkeypatch.setattr(type(tiny_tokenizer), "__call__", refuse)
    assert torch.equal(core.tokenize_text(tiny_tokenizer, text), expected)
    # another text gets another file; a short text is never cached
    assert core._token_cache_path(tiny_tokenizer, text + "!") != path
    monkeypatch.undo()
    core.tokenize_text(tiny_tokenizer, "short text")
    assert len(list(path.parent.glob("*.pt"))) == 1
