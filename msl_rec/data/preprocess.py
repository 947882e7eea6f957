"""Raw Amazon-2014 reviews + metadata -> BIGRec sliding windows (``id2name4Rec.json``, CSVs).

Steps (as BIGRec's notebook):

1. Read reviews (JSON lines, ``.gz`` or plain: ``reviewerID``, ``asin``, ``unixReviewTime``) and
   metadata (JSON lines of ``asin``, ``title``; Amazon 2014's meta files are Python-literal
   dicts, so each line is parsed as JSON and then with ``ast.literal_eval``).
2. Drop reviews of items without a non-blank title.
3. Iterative k-core: drop users and items with fewer than ``k_core`` interactions until none is left.
4. Map to integer ids: items ``1..N`` in sorted ``asin`` order (as the shipped Books data, ids
   from 1), users ``0..U-1`` in sorted ``reviewerID`` order.
5. Order each user's interactions by ``(time, asin)``. A user with ``n`` interactions gives one
   window per target position ``i`` from ``min(window, n) - 1`` to ``n - 1``; the window is
   ``seq[max(0, i - window + 1) : i + 1]`` (the history is up to ``window - 1`` items before the
   target). So a user with ``n < window`` gives the single window of their whole sequence and a
   user with ``n >= window`` gives ``n - window + 1`` full windows; after a 5-core filter windows
   hold 5 to 11 ids, as in the shipped Books files. No window shorter than that of the whole
   sequence is made (BIGRec does not start targets at the 2nd item).
6. Sort windows by ``(target time, user id, target position)`` and split by the ``split``
   fractions: the first ``int(n * split[0])`` are train, the next ``int(n * split[1])`` valid,
   the rest test. A window's ``timestamp`` is its target's time. Every split must get at least one
   window.
7. Write the four output files (:data:`OUTPUT_FILES`) to temporary files in ``output_dir`` and rename
   them into place only once all are written. A non-empty ``output_dir`` is refused unless
   ``overwrite``, and even then when it holds files other than those four (e.g. a ``train_sample.csv``
   drawn from an older ``train.csv``), which would no longer match the new data.

Each step logs one line (logger ``msl_rec.data.preprocess``, INFO: the console of
``msl-rec-preprocess``) with its counts and seconds, and each k-core round its survivors.
"""

from __future__ import annotations

import ast
import csv
import gzip
import json
import logging
import os
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from msl_rec.data.errors import DataError

log = logging.getLogger(__name__)
LINES_PER_PROGRESS_LOG = 1_000_000

SPLITS = ("train", "valid", "test")
OUTPUT_FILES = ("id2name4Rec.json", *(f"{name}.csv" for name in SPLITS))


@dataclass(frozen=True)
class Window:
    user_id: int
    item_ids: tuple[int, ...]
    timestamp: int


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number from 1, text)`` of each non-blank line; ``.gz`` files are gunzipped.

    A truncated or non-gzip ``.gz``, a line that is not UTF-8 or a file without a line is a
    :class:`DataError` naming the file (and line): all are signs of a broken download.
    """
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    gz = path.suffix == ".gz"
    line_no, found = 0, False
    try:
        # Bytes, decoded line by line, so that a bad byte is reported at its own line.
        with gzip.open(path, "rb") if gz else path.open("rb") as f:
            for line_no, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}: line {line_no} (byte {e.start} of the line) is not UTF-8; "
                                    "the file is corrupt: re-download it") from None
                if line.strip():
                    found = True
                    yield line_no, line
                if line_no % LINES_PER_PROGRESS_LOG == 0:  # the big review files take minutes
                    log.info("%s: %s lines read", path, f"{line_no:,}")
    except (OSError, EOFError, zlib.error) as e:
        if not gz:
            raise
        where = f"after line {line_no}" if line_no else "at the start"
        raise DataError(f"{path}: the gzip data is corrupt {where} ({type(e).__name__}: {e}); the file is "
                        "truncated or not gzip: re-download it (or drop the .gz suffix if it is plain JSON lines)"
                        ) from None
    if not found:
        raise DataError(f"{path}: the file holds no records (it is empty); re-download it")


_NOT_A_RECORD = ("not a JSON object or Python dict; the file is corrupt or not Amazon-2014 JSON lines: "
                 "re-download it")


def _parse_record(line: str, where: str) -> dict:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        try:
            rec = ast.literal_eval(line.strip())
        except (ValueError, SyntaxError):
            raise DataError(f"{where}: {_NOT_A_RECORD}") from None
    if not isinstance(rec, dict):
        raise DataError(f"{where}: {_NOT_A_RECORD}")
    return rec


def read_reviews(path: str | Path) -> list[tuple[str, str, int]]:
    """``(reviewerID, asin, unixReviewTime)`` per line; DataError names line and missing field."""
    path = Path(path)
    out = []
    for line_no, line in _lines(path):
        where = f"{path}: line {line_no}"
        rec = _parse_record(line, where)
        for field in ("reviewerID", "asin", "unixReviewTime"):
            if field not in rec:
                raise DataError(f"{where}: field {field!r} is missing")
        try:
            ts = int(rec["unixReviewTime"])
        except (TypeError, ValueError):
            raise DataError(f"{where}: field 'unixReviewTime' is not an integer") from None
        out.append((str(rec["reviewerID"]), str(rec["asin"]), ts))
    return out


def read_titles(path: str | Path) -> dict[str, str]:
    """``asin -> title`` for metadata lines with a non-blank title (others are left out: step 2)."""
    path = Path(path)
    titles = {}
    for line_no, line in _lines(path):
        rec = _parse_record(line, f"{path}: line {line_no}")
        if "asin" not in rec:
            raise DataError(f"{path}: line {line_no}: field 'asin' is missing")
        title = rec.get("title")
        if isinstance(title, str) and title.strip():
            titles[str(rec["asin"])] = title.strip()
    return titles


def k_core(interactions: list[tuple[str, str, int]], k: int) -> list[tuple[str, str, int]]:
    """Repeatedly drop interactions of users and items with fewer than ``k`` until stable (one log line
    per round: the interactions it kept, and the users and items it started from)."""
    round_no = 0
    while True:
        round_no += 1
        users = Counter(u for u, _, _ in interactions)
        items = Counter(i for _, i, _ in interactions)
        kept = [r for r in interactions if users[r[0]] >= k and items[r[1]] >= k]
        log.info("%d-core round %d: %s of %s interactions kept (%s users, %s items before the round)", k, round_no,
                 f"{len(kept):,}", f"{len(interactions):,}", f"{len(users):,}", f"{len(items):,}")
        if len(kept) == len(interactions):
            return kept
        interactions = kept


def make_windows(sequences: dict[int, list[tuple[int, int]]], window: int) -> list[tuple[int, int, Window]]:
    """``(target time, target position, Window)`` per window; ``sequences`` user -> [(item, time)] in order."""
    out = []
    for user, seq in sequences.items():
        n = len(seq)
        for i in range(min(window, n) - 1, n):
            ids = tuple(item for item, _ in seq[max(0, i - window + 1): i + 1])
            if len(ids) >= 2:
                out.append((seq[i][1], i, Window(user, ids, seq[i][1])))
    return out


def split_windows(windows: list[tuple[int, int, Window]], split: Sequence[float]) -> tuple[list[Window], ...]:
    if len(split) != 3 or any(f < 0 for f in split) or abs(sum(split) - 1) > 1e-6:
        raise ValueError(f"split must be three non-negative fractions summing to 1 (got {list(split)})")
    ordered = [w for _, _, w in sorted(windows, key=lambda t: (t[0], t[2].user_id, t[1]))]
    n_train, n_valid = int(len(ordered) * split[0]), int(len(ordered) * split[1])
    return ordered[:n_train], ordered[n_train:n_train + n_valid], ordered[n_train + n_valid:]


def check_splits(parts: Sequence[Sequence[Window]], split: Sequence[float], k_core_min: int, source: Path) -> None:
    """A :class:`DataError` if a split got no window (a model cannot be trained, selected or tested on it)."""
    sizes = dict(zip(SPLITS, map(len, parts)))
    empty = [name for name, n in sizes.items() if n == 0]
    if empty:
        total = sum(sizes.values())
        raise DataError(
            f"{source}: the {' and '.join(empty)} split would be empty: {total} window(s) split by "
            f"split={list(split)} give " + ", ".join(f"{k} {n}" for k, n in sizes.items()) + ". Every split "
            f"needs at least one window (each fraction times {total} at least 1): lower k_core (now "
            f"{k_core_min}), change the split fractions, or use more data")


def _staged_name(name: str) -> str:
    return f".{name}.partial"


def check_output_dir(output_dir: str | Path, overwrite: bool) -> None:
    """Refuse to write where the new files would replace data silently or leave it inconsistent.

    An absent or empty folder is fine. A non-empty one needs ``overwrite``, and even then may hold only
    :data:`OUTPUT_FILES` (and leftovers of an interrupted run): any other file (a ``train_sample.csv``
    drawn from the old ``train.csv``, a README with the old counts) would no longer match the new data.
    """
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output_dir={out} is a file, not a folder; pick another output_dir")
    leftovers = {_staged_name(name) for name in OUTPUT_FILES}
    present = sorted(p.name for p in out.iterdir() if p.name not in leftovers) if out.is_dir() else []
    if present and not overwrite:
        raise FileExistsError(
            f"output_dir={out} is not empty (it holds {', '.join(present)}); pick a new or empty output_dir, "
            f"or set overwrite=true to replace {', '.join(OUTPUT_FILES)} there")
    others = [name for name in present if name not in OUTPUT_FILES]
    if others:
        raise FileExistsError(
            f"output_dir={out}: overwrite=true replaces only {', '.join(OUTPUT_FILES)}, but the folder also "
            f"holds {', '.join(others)}, made from or describing the old data, which would no longer match the "
            "new files; move or delete them, or pick another output_dir")


def write_dataset(output_dir: Path, writers: dict[str, Callable[[TextIO], None]]) -> None:
    """Write each ``name -> writer(file)`` to a temporary file in ``output_dir``, then rename them all.

    A failure while writing (full disk, a bug) leaves ``output_dir`` as it was, so no half dataset
    is read later; the renames at the end are each atomic and do not fail for lack of space.
    """
    created = not output_dir.exists()
    output_dir.mkdir(parents=True, exist_ok=True)
    staged: dict[str, Path] = {}
    try:
        for name, write in writers.items():
            staged[name] = output_dir / _staged_name(name)
            try:
                with staged[name].open("w", newline="", encoding="utf-8") as f:
                    write(f)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as e:
                raise OSError(f"{output_dir / name}: could not be written ({e}); nothing in {output_dir} was "
                              "replaced. Free space or fix the folder's permissions and run again") from e
        for name, tmp in staged.items():
            os.replace(tmp, output_dir / name)
    except BaseException:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
        if created and not any(output_dir.iterdir()):
            output_dir.rmdir()
        raise


def write_windows(f: TextIO, windows: Sequence[Window]) -> None:
    """BIGRec CSV rows ``user_id,item_ids,timestamp`` (``item_ids`` as ``[1, 2, 3]``) to ``f``."""
    w = csv.writer(f)
    w.writerow(["user_id", "item_ids", "timestamp"])
    for win in windows:
        w.writerow([win.user_id, str(list(win.item_ids)), win.timestamp])


def preprocess(reviews_file: str | Path, meta_file: str | Path, output_dir: str | Path, k_core_min: int = 5,
               window: int = 11, split: Sequence[float] = (0.8, 0.1, 0.1), overwrite: bool = False
               ) -> dict[str, int]:
    """Run steps 1-7 and write ``id2name4Rec.json``, ``train.csv``, ``valid.csv``, ``test.csv``.

    ``overwrite`` allows replacing those four files in a non-empty ``output_dir`` (see
    :func:`check_output_dir`). Returns counts: users, items, interactions (after k-core), and windows
    per split.
    """
    if window < 2:
        raise ValueError(f"window must be >= 2 (got {window})")
    check_output_dir(output_dir, overwrite)  # before the minutes of reading, not after
    t0 = time.perf_counter()
    titles = read_titles(meta_file)
    log.info("read metadata %s: %s items with a title (%.1f s)", meta_file, f"{len(titles):,}", time.perf_counter() - t0)
    t0 = time.perf_counter()
    all_reviews = read_reviews(reviews_file)
    reviews = [r for r in all_reviews if r[1] in titles]
    log.info("read reviews %s: %s reviews, %s of items with a title (%.1f s)", reviews_file,
             f"{len(all_reviews):,}", f"{len(reviews):,}", time.perf_counter() - t0)
    del all_reviews
    t0 = time.perf_counter()
    reviews = k_core(reviews, k_core_min)
    log.info("%d-core: %s interactions left (%.1f s)", k_core_min, f"{len(reviews):,}", time.perf_counter() - t0)
    if not reviews:
        raise DataError(f"{reviews_file}: no interactions left after the title and {k_core_min}-core filters")
    asins = sorted({a for _, a, _ in reviews})
    item_id = {a: k + 1 for k, a in enumerate(asins)}
    user_id = {u: k for k, u in enumerate(sorted({u for u, _, _ in reviews}))}
    by_user: dict[int, list[tuple[int, int, str]]] = defaultdict(list)
    for u, a, t in reviews:
        by_user[user_id[u]].append((t, item_id[a], a))
    sequences = {u: [(i, t) for t, i, _ in sorted(rows, key=lambda r: (r[0], r[2]))] for u, rows in by_user.items()}
    t0 = time.perf_counter()
    windows = make_windows(sequences, window)
    log.info("windows of up to %d ids: %s from %s users and %s items (%.1f s)", window, f"{len(windows):,}",
             f"{len(user_id):,}", f"{len(item_id):,}", time.perf_counter() - t0)
    parts = split_windows(windows, split)
    log.info("split %s by target time: " + ", ".join(f"{name} {len(rows):,}" for name, rows in zip(SPLITS, parts)),
             list(split))
    check_splits(parts, split, k_core_min, Path(reviews_file))

    def write_titles(f: TextIO) -> None:
        f.write(json.dumps({str(item_id[a]): titles[a] for a in asins}, ensure_ascii=False, indent=0))

    writers = {"id2name4Rec.json": write_titles}
    for name, rows in zip(SPLITS, parts):
        writers[f"{name}.csv"] = lambda f, rows=rows: write_windows(f, rows)
    t0 = time.perf_counter()
    write_dataset(Path(output_dir), writers)
    log.info("wrote %s to %s (%.1f s)", ", ".join(writers), output_dir, time.perf_counter() - t0)
    return {"users": len(user_id), "items": len(item_id), "interactions": len(reviews),
            **{name: len(rows) for name, rows in zip(SPLITS, parts)}}
