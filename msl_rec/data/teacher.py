"""DLLM2Rec's teacher (``method=dllm2rec method.teacher_run=<folder>``): an LLM's ranked lists of the training rows
the student trains on, joined to those rows.

The teacher folder is an ``msl-rec-eval split=train`` output (``predictions.jsonl`` + ``eval_key.json``): its row
``r`` is row ``r`` of the training file it ranked (``subset=N``: its first N rows; ``shard=``: a slice). The join is
by that row index, and checked:

- ``eval_key.json``: ``split`` train, the same training file (``file_sha256``) and catalog (``item_file_sha256``)
  as the student's; the student draws no random rows (``data.sample``), so its row ``i`` is the file's row ``i``;
- every prediction row: its ``user_id`` / ``target_id`` are the student's row's (else an error naming the file,
  line and row), no row twice, every ranked item in the student's catalog (else an error naming the id).

Rows the teacher did not rank train with the student's base loss alone; how many have a list is logged.
Each ranked entry is a title group (items sharing a title); the teacher item is the group's smallest item id.
The teacher's distance of an entry is ``-score`` (grounding: the L2 distance; beam search: the mean negative
log-likelihood per token), what DLLM2Rec's confidence weight reads (BIGRec's ``dist``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from msl_rec.data.io import Sample
from msl_rec.utils.files import file_sha256

log = logging.getLogger(__name__)

PREDICTIONS = "predictions.jsonl"
KEY_FILE = "eval_key.json"
TEACHER_LOSSES = frozenset({"msl_rec.losses.DLLM2RecLoss"})
"""The losses that read a teacher (``needs_teacher``); any other loss with ``method.teacher_run`` is an error."""


@dataclass
class TeacherLists:
    """The teacher's lists per training row. R training rows, W the longest list.

    Attributes:
        items: (R, W) int64 catalog indices, best first; -1 past a row's list and on rows without one.
        distance: (R, W) float32 the teacher's distance of each entry (lower: more confident); 0 where no item.
        source: the predictions file.
    """

    items: torch.Tensor
    distance: torch.Tensor
    source: Path

    @property
    def taught(self) -> torch.Tensor:
        """(R,) bool: rows with a list."""
        return self.items[:, 0] >= 0

    def shortest(self) -> tuple[int, int]:
        """``(length, row)`` of the shortest list among taught rows (``(0, -1)``: none taught)."""
        lengths = (self.items >= 0).sum(dim=1).masked_fill(~self.taught, self.items.shape[1] + 1)
        if not bool(self.taught.any()):
            return 0, -1
        row = int(lengths.argmin())
        return int(lengths[row]), row

    def row(self, i: int) -> dict[str, torch.Tensor]:
        """Training row ``i``'s ``teacher_items`` (W,) and ``teacher_distance`` (W,) (what a batch stacks)."""
        return {"teacher_items": self.items[i], "teacher_distance": self.distance[i]}



def check_teacher_config(cfg: Mapping[str, Any]) -> None:
    """Refuse, before anything is loaded, a teacher without a loss that reads it, a teacher loss without a
    teacher, a teacher for an LLM method or with ``data.sample`` (random rows cannot be joined by row), and a
    ``method.teacher_run`` folder that does not exist. ``cfg``: a composed training config."""
    method = cfg.get("method") or {}
    teacher_run, name = method.get("teacher_run"), method.get("name")
    loss = (cfg.get("loss") or {}).get("_target_")
    check_teacher_pairing(loss in TEACHER_LOSSES, teacher_run, f"loss._target_={loss}")
    if teacher_run is None:
        return
    if method.get("kind", "llm") != "sequential":
        raise ValueError(f"method.teacher_run={teacher_run}: method={name} is not a sequential method; a teacher "
                         "distils into method=dllm2rec")
    if (cfg.get("data") or {}).get("sample") is not None:
        raise ValueError(f"data.sample={cfg['data']['sample']} draws random training rows, but the teacher's lists "
                         f"({teacher_run}) are joined by training-file row; use data.train_subset=N or neither")
    if not Path(teacher_run).is_dir():
        raise FileNotFoundError(f"method.teacher_run={teacher_run}: no such folder; give an `msl-rec-eval "
                                "split=train` output folder of the teacher LLM")


def check_teacher_pairing(needs_teacher: bool, teacher_run: str | None, loss: str) -> None:
    """A loss that reads a teacher needs ``method.teacher_run``, and a teacher needs such a loss."""
    if needs_teacher and not teacher_run:
        raise ValueError(f"{loss} distils an LLM teacher: give method.teacher_run=<an `msl-rec-eval split=train` "
                         "folder of the teacher LLM>")
    if teacher_run and not needs_teacher:
        raise ValueError(f"method.teacher_run={teacher_run} but {loss} reads no teacher; use loss=dllm2rec "
                         "(method=dllm2rec) or drop method.teacher_run")


def _read_key(folder: Path) -> dict[str, Any]:
    key_file = folder / KEY_FILE
    if not key_file.is_file():
        raise FileNotFoundError(f"method.teacher_run={folder}: no {key_file} (not an msl-rec-eval output folder); "
                                "run `msl-rec-eval split=train ...` with the teacher LLM and give its folder")
    try:
        return json.loads(key_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{key_file} is not valid JSON ({e.msg} at line {e.lineno}); rerun the evaluation") from None


def _check_key(folder: Path, key: Mapping[str, Any], train_file: Path, item_file: Path) -> None:
    """The teacher ranked this training file's rows over this catalog, and finished."""
    key_file = folder / KEY_FILE
    if key.get("split") != "train":
        raise ValueError(f"method.teacher_run={folder}: {key_file} says split={key.get('split')!r}; the teacher must "
                         f"rank the training rows the student trains on: msl-rec-eval split=train "
                         f"dataset.train_file={train_file} ...")
    if key.get("file_sha256") != file_sha256(train_file):
        raise ValueError(f"method.teacher_run={folder} ranked the rows of {key.get('file')} (sha256 "
                         f"{str(key.get('file_sha256'))[:12]}), but the student trains on {train_file} (sha256 "
                         f"{file_sha256(train_file)[:12]}): its row numbers would name other rows; evaluate the "
                         f"teacher with dataset.train_file={train_file}")
    if key.get("item_file_sha256") != file_sha256(item_file):
        raise ValueError(f"method.teacher_run={folder} ranked another catalog ({KEY_FILE} item_file_sha256 differs "
                         f"from {item_file}'s); its item ids would not be the student's items")
    unfinished = sorted(folder.glob("predictions.part*.jsonl"))
    if unfinished or not (folder / "metrics.json").is_file():
        left = "; ".join(map(str, unfinished)) or "no metrics.json"
        raise ValueError(f"method.teacher_run={folder}: the evaluation did not finish ({left}); rerun the same "
                         "msl-rec-eval command to complete it")


def load_teacher(teacher_run: str | Path, samples: Sequence[Sample], index_of: Mapping[int, int],
                 train_file: str | Path, item_file: str | Path) -> TeacherLists:
    """The teacher's lists joined to the student's training rows (module docstring), checked.

    Args:
        teacher_run: the teacher's ``msl-rec-eval split=train`` folder.
        samples: the student's training rows; row ``i`` must be ``train_file``'s row ``i``.
        index_of: item id -> the student's catalog index (:attr:`~msl_rec.data.sequences.TitleCatalog.index_of`).
        train_file, item_file: the student's training file and catalog.
    """
    folder = Path(teacher_run)
    if not folder.is_dir():
        raise FileNotFoundError(f"method.teacher_run={teacher_run}: no such folder; give an `msl-rec-eval "
                                "split=train` output folder of the teacher LLM")
    _check_key(folder, _read_key(folder), Path(train_file), Path(item_file))
    path = folder / PREDICTIONS
    if not path.is_file():
        raise FileNotFoundError(f"method.teacher_run={folder}: no {path}")
    lists: dict[int, tuple[list[int], list[float]]] = {}
    unused = 0
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        where = f"{path}: line {line_no}"
        try:
            p = json.loads(line)
            row, user, target = int(p["row"]), int(p["user_id"]), int(p["target_id"])
            ranked, scores = p["ranked_ids"], [float(s) for s in p["scores"]]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise ValueError(f"{where} is not a prediction row (JSON with row, user_id, target_id, ranked_ids, "
                             "scores)") from None
        if row in lists:
            raise ValueError(f"{where}: row {row} again; the file was edited or appended twice")
        if row >= len(samples) or row < 0:
            unused += 1  # a teacher over more rows than the student's data.train_subset: not a mismatch
            continue
        if (user, target) != (samples[row].user_id, samples[row].target):
            raise ValueError(f"{where}: row {row} has user {user} / target {target} but the student's training row "
                             f"{row} has user {samples[row].user_id} / target {samples[row].target}: the teacher "
                             "ranked other rows (another file, or data.sample) and cannot teach this run")
        if len(ranked) != len(scores) or not ranked:
            raise ValueError(f"{where}: row {row} has {len(ranked)} ranked entries and {len(scores)} scores")
        items = []
        for entry in ranked:
            item = min(entry) if isinstance(entry, list) and entry else entry
            if isinstance(item, bool) or not isinstance(item, int) or item not in index_of:
                raise ValueError(f"{where}: row {row} ranks item id {item!r}, which is not in the student's catalog "
                                 f"({item_file})")
            items.append(index_of[item])
        lists[row] = (items, [-s for s in scores])
    if not lists:
        raise ValueError(f"method.teacher_run={folder}: {path} has no list for any of the {len(samples)} training "
                         "rows; evaluate the teacher over (the first rows of) the student's training file")
    width = max(len(items) for items, _ in lists.values())
    items = torch.full((len(samples), width), -1, dtype=torch.long)
    distance = torch.zeros((len(samples), width), dtype=torch.float32)
    for row, (ids, dist) in lists.items():
        items[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        distance[row, : len(dist)] = torch.tensor(dist, dtype=torch.float32)
    log.info("teacher %s: ranked lists for %d of %d training rows (the other %d train with the base loss only)%s",
             path, len(lists), len(samples), len(samples) - len(lists),
             f"; {unused} teacher rows beyond the student's training rows unused" if unused else "")
    return TeacherLists(items, distance, path)
