import csv
import gzip
import json

import pytest

from msl_rec.data.errors import DataError
from msl_rec.data.io import read_samples
from msl_rec.data.preprocess import preprocess

# (user, asin, time). E has no title; F is reviewed once. u3 is left with one review after E goes
# (dropped in the first k-core round); u5 only after F goes (second round): the filter iterates.
REVIEWS = [
    ("u1", "A", 1), ("u1", "B", 2), ("u1", "C", 3), ("u1", "D", 4),
    ("u2", "B", 5), ("u2", "A", 6), ("u2", "C", 7),
    ("u3", "A", 8), ("u3", "E", 9),
    ("u4", "D", 10), ("u4", "C", 11),
    ("u5", "F", 12), ("u5", "A", 13),
]
META = ["{'asin': 'A', 'title': 'Alpha'}",            # Python-literal, as Amazon 2014 meta
        json.dumps({"asin": "B", "title": "Beta"}),
        json.dumps({"asin": "C", "title": "Gamma \"G\""}),
        "{'asin': 'D', 'title': 'Delta', 'price': 3.5}",
        json.dumps({"asin": "E"}),
        json.dumps({"asin": "F", "title": "Phi"})]


def write_raw(tmp_path, gz=True):
    reviews = tmp_path / ("reviews.json.gz" if gz else "reviews.json")
    lines = "\n".join(json.dumps({"reviewerID": u, "asin": a, "unixReviewTime": t, "overall": 5.0})
                      for u, a, t in REVIEWS) + "\n"
    if gz:
        with gzip.open(reviews, "wt") as f:
            f.write(lines)
    else:
        reviews.write_text(lines)
    meta = tmp_path / "meta.json"
    meta.write_text("\n".join(META) + "\n")
    return reviews, meta


@pytest.mark.parametrize("gz", [True, False])
def test_windows_and_split_by_hand(tmp_path, gz):
    reviews, meta = write_raw(tmp_path, gz)
    out = tmp_path / "out"
    counts = preprocess(reviews, meta, out, k_core_min=2, window=3, split=[0.5, 0.25, 0.25])
    # items A..D -> 1..4 (sorted asin); users u1, u2, u4 -> 0, 1, 2
    assert json.loads((out / "id2name4Rec.json").read_text()) == {
        "1": "Alpha", "2": "Beta", "3": 'Gamma "G"', "4": "Delta"}
    assert counts == {"users": 3, "items": 4, "interactions": 9, "train": 2, "valid": 1, "test": 1}
    rows = {name: list(csv.reader((out / f"{name}.csv").open())) for name in ("train", "valid", "test")}
    # u1 [1,2,3,4] -> windows ending at its 3rd and 4th items; u2 [2,1,3] -> one; u4 [4,3] -> one
    assert rows["train"] == [["user_id", "item_ids", "timestamp"], ["0", "[1, 2, 3]", "3"], ["0", "[2, 3, 4]", "4"]]
    assert rows["valid"][1:] == [["1", "[2, 1, 3]", "7"]]
    assert rows["test"][1:] == [["2", "[4, 3]", "11"]]
    titles = {int(k): v for k, v in json.loads((out / "id2name4Rec.json").read_text()).items()}
    assert [s.item_ids for s in read_samples(out / "train.csv", titles)] == [(1, 2, 3), (2, 3, 4)]


def test_bad_review_line_names_file_line_field(tmp_path):
    reviews, meta = write_raw(tmp_path, gz=False)
    reviews.write_text(reviews.read_text() + json.dumps({"reviewerID": "u9", "asin": "A"}) + "\n")
    with pytest.raises(DataError, match=r"reviews.json: line 14: field 'unixReviewTime' is missing"):
        preprocess(reviews, meta, tmp_path / "out", k_core_min=2, window=3)


def test_app_composes_and_runs(tmp_path):
    from hydra import compose, initialize_config_dir

    from msl_rec.preprocess import run
    from msl_rec.utils.config import CONFIG_DIR

    reviews, meta = write_raw(tmp_path)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("preprocess", overrides=[f"reviews_file={reviews}", f"meta_file={meta}",
                                               f"output_dir={tmp_path / 'app'}", "k_core=2", "window=3",
                                               "split=[0.5,0.25,0.25]"])  # the default leaves valid empty
    counts = run(cfg)
    assert counts["users"] == 3 and (tmp_path / "app" / "test.csv").is_file()


# --- output folder: refuse to clobber, replace atomically (issue 19) ---

def make_dataset(tmp_path, out, **kwargs):
    """Preprocess the hand-checked raw data into ``out``; the files' contents by name."""
    reviews, meta = write_raw(tmp_path)
    preprocess(reviews, meta, out, k_core_min=2, window=3, **kwargs)
    return {p.name: p.read_text() for p in out.iterdir()}


def test_non_empty_output_dir_needs_overwrite(tmp_path):
    out = tmp_path / "books"
    before = make_dataset(tmp_path, out, split=[0.5, 0.25, 0.25])
    with pytest.raises(FileExistsError, match=rf"output_dir={out} is not empty .*set overwrite=true"):
        make_dataset(tmp_path, out, split=[0.25, 0.5, 0.25])
    assert {p.name: p.read_text() for p in out.iterdir()} == before
    after = make_dataset(tmp_path, out, split=[0.25, 0.5, 0.25], overwrite=True)
    assert after.keys() == before.keys() and after["valid.csv"] != before["valid.csv"]
    assert after["train.csv"].splitlines()[1:] == ["0,\"[1, 2, 3]\",3"]


def test_overwrite_refuses_files_derived_from_the_old_data(tmp_path):
    out = tmp_path / "books"
    before = make_dataset(tmp_path, out, split=[0.5, 0.25, 0.25])
    (out / "train_sample.csv").write_text(before["train.csv"])
    (out / "README.md").write_text("old counts\n")
    with pytest.raises(FileExistsError, match=rf"output_dir={out}: overwrite=true replaces only .* also holds "
                                              r"README.md, train_sample.csv"):
        make_dataset(tmp_path, out, split=[0.25, 0.5, 0.25], overwrite=True)
    assert (out / "train.csv").read_text() == before["train.csv"]


def test_app_overwrite_key(tmp_path):
    from hydra import compose, initialize_config_dir

    from msl_rec.preprocess import run
    from msl_rec.utils.config import CONFIG_DIR

    reviews, meta = write_raw(tmp_path)
    out = tmp_path / "app"
    out.mkdir()
    (out / "train.csv").write_text("old\n")
    base = [f"reviews_file={reviews}", f"meta_file={meta}", f"output_dir={out}", "k_core=2", "window=3",
            "split=[0.5,0.25,0.25]"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        refused, allowed = compose("preprocess", overrides=base), compose("preprocess", overrides=base + ["overwrite=true"])
    with pytest.raises(FileExistsError, match="overwrite=true"):
        run(refused)
    assert (out / "train.csv").read_text() == "old\n"
    assert run(allowed)["train"] == 2 and (out / "train.csv").read_text() != "old\n"


@pytest.mark.parametrize("existing", [True, False])
def test_failed_write_leaves_the_folder_as_it_was(tmp_path, monkeypatch, existing):
    import msl_rec.data.preprocess as pre

    out = tmp_path / "books"
    before = make_dataset(tmp_path, out, split=[0.5, 0.25, 0.25]) if existing else None
    calls = []
    real_write = pre.write_windows

    def write_until_disk_full(f, rows):
        calls.append(len(rows))
        if len(calls) == 2:  # train.csv (and the titles) are written, valid.csv is not
            raise OSError(28, "No space left on device")
        real_write(f, rows)

    monkeypatch.setattr(pre, "write_windows", write_until_disk_full)
    with pytest.raises(OSError, match=r"valid.csv: could not be written .*No space left"):
        make_dataset(tmp_path, out, split=[0.25, 0.5, 0.25], **({"overwrite": True} if existing else {}))
    if existing:
        assert {p.name: p.read_text() for p in out.iterdir()} == before
    else:
        assert not out.exists()


# --- a split without windows (issue 19) ---

@pytest.mark.parametrize("split, empty, sizes", [
    ([0.8, 0.1, 0.1], "valid", "train 3, valid 0, test 1"),   # the default fractions on 4 windows
    ([0.0, 0.5, 0.5], "train", "train 0, valid 2, test 2"),
    ([0.5, 0.5, 0.0], "test", "train 2, valid 2, test 0"),
])
def test_empty_split_is_an_error(tmp_path, split, empty, sizes):
    reviews, meta = write_raw(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=rf"reviews.json.gz: the {empty} split would be empty: 4 window\(s\) "
                                        rf"split by split=\[.*\] give {sizes}\. .*lower k_core \(now 2\), change the "
                                        r"split fractions, or use more data"):
        preprocess(reviews, meta, out, k_core_min=2, window=3, split=split)
    assert not out.exists()


# --- corrupt or truncated inputs (issue 19) ---

def gzip_bytes(tmp_path):
    reviews, _ = write_raw(tmp_path)
    return reviews.read_bytes()


@pytest.mark.parametrize("corrupt, match", [
    pytest.param(lambda gz: gz[: len(gz) // 2], r"gzip data is corrupt after line \d+ \(EOFError", id="truncated"),
    pytest.param(lambda gz: gz[:5], r"gzip data is corrupt at the start \(EOFError", id="truncated-header"),
    pytest.param(gzip.decompress, r"gzip data is corrupt at the start \(BadGzipFile", id="plain-text-named-gz"),
    pytest.param(lambda gz: gz[:40] + bytes(b ^ 0xFF for b in gz[40:60]) + gz[60:], r"", id="flipped-bytes"),
    pytest.param(lambda gz: b"", r"holds no records \(it is empty\)", id="empty"),
])
def test_corrupt_gzip_names_the_file_and_says_redownload(tmp_path, corrupt, match):
    good = gzip_bytes(tmp_path)
    reviews, meta = tmp_path / "reviews.json.gz", tmp_path / "meta.json"
    reviews.write_bytes(corrupt(good))
    with pytest.raises(DataError, match=match) as err:
        preprocess(reviews, meta, tmp_path / "out", k_core_min=2, window=3)
    assert str(reviews) in str(err.value) and "re-download it" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_truncated_meta_gzip_is_named(tmp_path):
    reviews, meta = write_raw(tmp_path)
    meta_gz = tmp_path / "meta.json.gz"
    meta_gz.write_bytes(gzip.compress(meta.read_bytes())[:-12])
    with pytest.raises(DataError, match=rf"{meta_gz}: the gzip data is corrupt .*re-download it"):
        preprocess(reviews, meta_gz, tmp_path / "out", k_core_min=2, window=3)


@pytest.mark.parametrize("bad_line, match", [
    pytest.param(b"{'asin': 'A', 'tit", r"line 14: not a JSON object or Python dict; .*re-download it", id="cut"),
    pytest.param(b'{"asin": "\xff"}', r"line 14 \(byte 10 of the line\) is not UTF-8; .*re-download it",
                 id="not-utf8"),
])
def test_bad_line_in_gzip_names_file_and_line(tmp_path, bad_line, match):
    reviews, meta = write_raw(tmp_path)
    reviews.write_bytes(gzip.compress(gzip.decompress(reviews.read_bytes()) + bad_line + b"\n"))
    with pytest.raises(DataError, match=rf"reviews.json.gz: {match}"):
        preprocess(reviews, meta, tmp_path / "out", k_core_min=2, window=3)
