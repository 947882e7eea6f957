"""The committed comparison (results/compare_cpu) re-evaluates to its own predictions with today's code.

Each committed adapter is evaluated again on the first users of Books valid with the settings its
``eval_key.json`` records (the run's prompt cut-off 384 and ``max_new_tokens`` 64, from before
``max_new_tokens: null``); every user's ranked list and rank must be the committed one, and the beam
scores and ``target_logp`` equal within 1e-4 (the committed ``target_logp`` came from a padded batch,
today's from the prompt KV the search computed: float32 rounding apart, no more). Slow: SmolLM2.
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
                                "scoring.num_negatives=0", "trainer.enable_progress_bar=false"], tmp_path)
    evaluate_app(cfg)
    now = [json.loads(line) for line in (Path(cfg.paths.output_dir) / "predictions.jsonl").read_text().splitlines()]
    before = committed_rows(loss)
    assert [(p["user_id"], p["target_id"]) for p in now] == [(p["user_id"], p["target_id"]) for p in before]
    for a, b in zip(now, before):
        assert a["ranked_ids"] == b["ranked_ids"] and a["rank"] == b["rank"], f"user {a['user_id']}"
        assert max(abs(x - y) for x, y in zip(a["scores"], b["scores"])) <= TOL
        assert abs(a["target_logp"] - b["target_logp"]) <= TOL
