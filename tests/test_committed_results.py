"""The committed comparison (results/compare_cpu) re-evaluates to its own metrics with today's code.

Each committed adapter is evaluated again on the first users of Books valid with the settings its
``eval_key.json`` records (the run's prompt cut-off 384 and ``max_new_tokens`` 64, from before
``max_new_tokens: null``). Every user's rank of the target (so NDCG/HR) must be the committed one and
``target_logp`` equal within 1e-4 (float32 in both; the committed one came from a padded batch).

The rest of the ranked lists is not compared: the committed beam search ran under the old
``decoder.dtype: auto`` (its ``eval_key.json`` says so), whose scores differ from float32 ones by up to
0.5 and order many lists differently; the comparison's own code (437cc25) run in float32 here gives
today's scores, not the committed ones. Slow: SmolLM2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from msl_rec.eval import evaluate_app
from msl_rec.utils.config import PROJECT_ROOT
from tests.conftest import compose

RESULTS = Path(PROJECT_ROOT) / "results" / "compare_cpu"
USERS = 6
TOL = 1e-4


def committed_rows(loss: str) -> list[dict]:
    lines = (RESULTS / "runs" / "eval" / loss / "predictions.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines[:USERS]]


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["lml", "msl", "msl_ats"])
def test_committed_adapter_reproduces_its_predictions(loss, tmp_path):
    key = json.loads((RESULTS / "runs" / "eval" / loss / "eval_key.json").read_text())
    cfg = compose("eval.yaml", [f"ckpt_path={RESULTS / f'{loss}.ckpt'}", "backbone=smollm2_135m", "logger=none",
                                "dataset.cutoff_len=384", f"decoder.max_new_tokens={key['decoder']['max_new_tokens']}",
                                f"decoder.num_beams={key['decoder']['num_beams']}", f"subset={USERS}",
                                "scoring.num_negatives=0"], tmp_path)
    evaluate_app(cfg)
    now = [json.loads(line) for line in (Path(cfg.paths.output_dir) / "predictions.jsonl").read_text().splitlines()]
    before = committed_rows(loss)
    assert [(p["user_id"], p["target_id"]) for p in now] == [(p["user_id"], p["target_id"]) for p in before]
    for a, b in zip(now, before):
        assert a["rank"] == b["rank"], f"user {a['user_id']}"
        assert abs(a["target_logp"] - b["target_logp"]) <= TOL, f"user {a['user_id']}"
    assert key["decoder"]["dtype"] == "auto"  # why the lists themselves are not compared (docstring)
