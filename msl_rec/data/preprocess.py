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
   the rest test. A window's ``timestamp`` is its target's time.
"""

from __future__ import annotations

import ast
import csv
import gzip
import json
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from msl_rec.data.errors import DataError


@dataclass(frozen=True)
class Window:
    user_id: int
    item_ids: tuple[int, ...]
    timestamp: int


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                yield line_no, line


def _parse_record(line: str, where: str) -> dict:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        try:
            rec = ast.literal_eval(line.strip())
        except (ValueError, SyntaxError):
            raise DataError(f"{where}: not a JSON object or Python dict") from None
    if not isinstance(rec, dict):
        raise DataError(f"{where}: not a JSON object or Python dict")
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
    """Repeatedly drop interactions of users and items with fewer than ``k`` until stable."""
    while True:
        users = Counter(u for u, _, _ in interactions)
        items = Counter(i for _, i, _ in interactions)
        kept = [r for r in interactions if users[r[0]] >= k and items[r[1]] >= k]
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


def write_windows(path: Path, windows: Sequence[Window]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "item_ids", "timestamp"])
        for win in windows:
            w.writerow([win.user_id, str(list(win.item_ids)), win.timestamp])


def preprocess(reviews_file: str | Path, meta_file: str | Path, output_dir: str | Path, k_core_min: int = 5,
               window: int = 11, split: Sequence[float] = (0.8, 0.1, 0.1)) -> dict[str, int]:
    """Run steps 1-6 and write ``id2name4Rec.json``, ``train.csv``, ``valid.csv``, ``test.csv``.

    Returns counts: users, items, interactions (after k-core), and windows per split.
    """
    if window < 2:
        raise ValueError(f"window must be >= 2 (got {window})")
    titles = read_titles(meta_file)
    reviews = [r for r in read_reviews(reviews_file) if r[1] in titles]
    reviews = k_core(reviews, k_core_min)
    if not reviews:
        raise DataError(f"{reviews_file}: no interactions left after the title and {k_core_min}-core filters")
    asins = sorted({a for _, a, _ in reviews})
    item_id = {a: k + 1 for k, a in enumerate(asins)}
    user_id = {u: k for k, u in enumerate(sorted({u for u, _, _ in reviews}))}
    by_user: dict[int, list[tuple[int, int, str]]] = defaultdict(list)
    for u, a, t in reviews:
        by_user[user_id[u]].append((t, item_id[a], a))
    sequences = {u: [(i, t) for t, i, _ in sorted(rows, key=lambda r: (r[0], r[2]))] for u, rows in by_user.items()}
    train, valid, test = split_windows(make_windows(sequences, window), split)

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "id2name4Rec.json").write_text(
        json.dumps({str(item_id[a]): titles[a] for a in asins}, ensure_ascii=False, indent=0), encoding="utf-8")
    for name, rows in (("train", train), ("valid", valid), ("test", test)):
        write_windows(out / f"{name}.csv", rows)
    return {"users": len(user_id), "items": len(item_id), "interactions": len(reviews),
            "train": len(train), "valid": len(valid), "test": len(test)}
