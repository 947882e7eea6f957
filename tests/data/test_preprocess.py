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
                                               f"output_dir={tmp_path / 'app'}", "k_core=2", "window=3"])
    counts = run(cfg)
    assert counts["users"] == 3 and (tmp_path / "app" / "test.csv").is_file()
