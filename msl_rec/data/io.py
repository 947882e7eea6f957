"""Read BIGRec sliding-window CSVs (``user_id,item_ids,timestamp``) into :class:`Sample` rows.

``item_ids`` is a Python-style list of item ids, oldest first; the last id is the target and the
ones before it are the history (at least one). Every bad row raises :class:`DataError` naming the
file, the data row (1-based, header excluded), its line in the file and the field; nothing is
silently dropped.
"""

from __future__ import annotations

import ast
import csv
import io
from collections.abc import Container
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from msl_rec.data.errors import DataError

COLUMNS = ("user_id", "item_ids", "timestamp")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def read_text(path: str | Path) -> str:
    """A UTF-8 text file (a leading byte-order mark is dropped); a bad byte is a :class:`DataError`
    naming the line and byte offset."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}: line {line} (byte offset {e.start}): byte {data[e.start:e.start + 1]!r} is not UTF-8; "
            "re-save the file as UTF-8"
        ) from None


def check_int64(value: int, where: str, field: str) -> int:
    """``value`` if it fits an int64 (the tensors' dtype), else a :class:`DataError`."""
    if not INT64_MIN <= value <= INT64_MAX:
        raise DataError(f"{where}: field {field!r}: {value} does not fit in int64; renumber the ids")
    return value


@dataclass(frozen=True)
class Sample:
    """One sliding window.

    Attributes:
        user_id: the user's integer id.
        history: item ids the user interacted with before the target, oldest first (>= 1).
        target: the item id to recommend (the window's last id).
        timestamp: the target interaction's Unix time in seconds.
    """

    user_id: int
    history: tuple[int, ...]
    target: int
    timestamp: int

    @property
    def item_ids(self) -> tuple[int, ...]:
        return self.history + (self.target,)


def _parse_int(value: str | None, where: str, field: str) -> int:
    try:
        number = int(str(value).strip())
    except (TypeError, ValueError):
        raise DataError(f"{where}: field {field!r} is not an integer (got {value!r})") from None
    return check_int64(number, where, field)


def _parse_item_ids(value: str | None, where: str) -> list[int]:
    try:
        ids = ast.literal_eval(str(value).strip())
    except (ValueError, SyntaxError):
        ids = None
    if not isinstance(ids, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise DataError(f"{where}: field 'item_ids' is not a list of integers (got {value!r})")
    if len(ids) < 2:
        raise DataError(
            f"{where}: field 'item_ids' has {len(ids)} id(s); need a history of at least one item plus the target"
        )
    return [check_int64(i, where, "item_ids") for i in ids]


def dataset_file(dataset_cfg: Any, key: str) -> Path | None:
    """``dataset.<key>`` (``item_file``, ``train_file`` ...) as a path, ``None`` when the key is null.

    A file that does not exist is a :class:`DataError` naming the dataset, the key and the file and,
    when the dataset config has a ``build`` command (datasets that are not shipped, e.g.
    configs/dataset/toy.yaml), saying to run it; otherwise to point the key at an existing file.
    """
    value = dataset_cfg.get(key)
    if value is None:
        return None
    path = Path(str(value))
    if path.is_file():
        return path
    name = dataset_cfg.get("name") or "?"
    build = dataset_cfg.get("build")
    how = (f"The {name} dataset is not shipped; build it (its raw Amazon-2014 reviews and metadata files) with:\n"
           f"    {build}\nor point dataset.root= at a folder that holds it." if build else
           f"Point dataset.{key}= (or dataset.root=) at an existing file (configs/dataset/{name}.yaml).")
    raise DataError(f"dataset={name}: dataset.{key}={path} does not exist. {how}")


def read_samples(path: str | Path, known_items: Container[int] | None = None) -> list[Sample]:
    """All rows of a BIGRec CSV, in file order.

    Args:
        path: the CSV file.
        known_items: if given (e.g. the catalog's ``titles``), every item id must be in it.

    Raises:
        DataError: missing file, not UTF-8, no data rows, missing column, a malformed ``user_id``/``timestamp``/``item_ids``
            field, fewer than two ids, or an unknown item id; the message names file, row and field.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    samples: list[Sample] = []
    with io.StringIO(read_text(path), newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: header: missing column(s) {missing} (expected {list(COLUMNS)})")
        for row_no, row in enumerate(reader, start=1):
            where = f"{path}: row {row_no} (line {reader.line_num})"
            user = _parse_int(row["user_id"], where, "user_id")
            ids = _parse_item_ids(row["item_ids"], where)
            ts = _parse_int(row["timestamp"], where, "timestamp")
            if known_items is not None:
                unknown = [i for i in ids if i not in known_items]
                if unknown:
                    raise DataError(f"{where}: field 'item_ids': unknown item id(s) {unknown} (not in the item file)")
            samples.append(Sample(user, tuple(ids[:-1]), ids[-1], ts))
    if not samples:
        raise DataError(f"{path}: no data rows (only a header); point the dataset config at a file with rows")
    return samples
