"""A dataset whose files are missing (``dataset=toy`` before it is built): the error names the file and
the command that builds it."""

from __future__ import annotations

import json

import pytest

from msl_rec.data.errors import DataError


def test_unbuilt_dataset_names_the_file_and_the_build_command(compose_train, tmp_path):
    from msl_rec.data.build import build_data

    root = tmp_path / "toy"
    cfg = compose_train("dataset=toy", f"dataset.root={root}")
    with pytest.raises(DataError) as err:
        build_data(cfg)
    message = str(err.value)
    assert f"dataset=toy: dataset.item_file={root / 'id2name4Rec.json'} does not exist" in message
    assert ("msl-rec-preprocess reviews_file=reviews_Toys_and_Games_5.json.gz "
            f"meta_file=meta_Toys_and_Games.json.gz output_dir={root}") in message

    # a half-built folder: the first missing split file is named, with the same command
    root.mkdir()
    (root / "id2name4Rec.json").write_text(json.dumps({"1": "a toy", "2": "another toy"}))
    _, _, dm = build_data(cfg)
    with pytest.raises(DataError, match=rf"dataset.train_file={root / 'train.csv'} does not exist(.|\n)*"
                                        rf"msl-rec-preprocess .* output_dir={root}"):
        dm.setup("fit")


def test_missing_file_of_a_dataset_without_a_build_command(compose_train, tmp_path):
    from msl_rec.data.io import dataset_file

    cfg = compose_train("dataset=books", f"dataset.valid_file={tmp_path / 'valid.csv'}")
    assert dataset_file(cfg.dataset, "item_file").is_file() and dataset_file(cfg.dataset, "test_file") is None
    with pytest.raises(DataError, match=r"dataset=books: dataset.valid_file=.*valid.csv does not exist. Point "
                                        r"dataset.valid_file= \(or dataset.root=\) at an existing file"):
        dataset_file(cfg.dataset, "valid_file")
