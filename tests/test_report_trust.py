"""The report and the comparison driver never give a silently wrong result (issue 19): runs are
grouped by (dataset, backbone, decoder, split, users, loss); a duplicated seed, a truncated file and
a failed job are said out loud; ``experiments.compare out=`` writes nowhere else, and a rerun refuses
runs made with other settings."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from msl_rec.utils.config import PROJECT_ROOT

LML = {"_target_": "msl_rec.losses.LMLLoss", "tau": 1.0}
MSL = {"_target_": "msl_rec.losses.MSLLoss", "tau": 1.5}


def make_run(folder: Path, cfg: dict, metrics: dict | None = None) -> Path:
    """A run folder: ``.hydra/config.yaml`` and, unless None, ``metrics.json``."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    if metrics is not None:
        (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def train_cfg(loss: dict, seed: int, dataset: str = "books", backbone: str = "tiny_llama") -> dict:
    return {"loss": loss, "seed": seed, "dataset": {"name": dataset}, "backbone": {"name": backbone},
            "decoder": {"name": "cbs_masked"}, "data": {"valid_subset": 64}}


def val_metrics(ndcg10: float) -> dict:
    return {"ndcg@5": ndcg10, "ndcg@10": ndcg10, "hr@5": ndcg10, "hr@10": ndcg10}


def make_eval(folder: Path, run_dir: Path | None, ranks: list[int], rows: list[int],
              decoder: str = "cbs_masked") -> Path:
    """An ``msl-rec-eval`` folder of ``run_dir`` (None: a model-free baseline) on split rows ``rows``
    (user ``row``, target ``1000 + row``); its own config names the eval.yaml default backbone."""
    from msl_rec.metrics import compute_metrics

    cfg = {"split": "valid", "dataset": {"name": "books"}, "backbone": {"name": "smollm2_135m"},
           "decoder": {"name": decoder}, "seed": 42}
    if run_dir is not None:
        cfg |= {"run_dir": str(run_dir), "ckpt_path": str(run_dir / "checkpoints" / "last.ckpt")}
    make_run(folder, cfg, compute_metrics(ranks))
    lines = [json.dumps({"row": row, "user_id": row, "target_id": 1000 + row, "rank": rank,
                         "ranked_ids": [[7]], "scores": [0.0]}) for row, rank in zip(rows, ranks)]
    (folder / "predictions.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def section(text: str, start: str) -> str:
    """The markdown section whose heading starts with ``start``, up to the next ``## `` heading."""
    return text.split(start, 1)[1].split("\n## ", 1)[0]


def test_report_groups_runs_by_dataset_and_backbone(tmp_path):
    """Old behaviour: one LML row of 2 runs (books and toy mixed, mean 0.3) and MSL at -33% against it."""
    from experiments.report import write_report

    make_run(tmp_path / "lml_books", train_cfg(LML, 1), val_metrics(0.1))
    make_run(tmp_path / "lml_toy", train_cfg(LML, 1, dataset="toy"), val_metrics(0.5))
    make_run(tmp_path / "msl_books", train_cfg(MSL, 1), val_metrics(0.2))
    make_run(tmp_path / "msl_books_big", train_cfg(MSL, 1, backbone="smollm2_135m"), val_metrics(0.4))
    text = write_report([tmp_path], tmp_path / "out").read_text()
    books = section(text, "## C1. books / smollm2_135m")
    tiny = section(text, "## C2. books / tiny_llama / cbs_masked / valid first 64 rows")
    toy = section(text, "## C3. toy / tiny_llama")
    assert "| LML | 1 | 64 | 0.1000 |" in tiny and "| MSL (tau=1.5) | 1 | 64 | 0.2000 (+100.0%) |" in tiny
    assert "| LML | 1 | 64 | 0.5000 |" in toy and "MSL" not in toy
    assert "| MSL (tau=1.5) | 1 | 64 | 0.4000 |" in books and "%" not in books  # no LML on that backbone
    assert "| `lml_toy` | LML | 1 | 0.5000 | 0.5000 |  | C3 |" in text


def test_report_refuses_a_seed_counted_twice(tmp_path):
    from experiments.report import write_report

    make_run(tmp_path / "a", train_cfg(LML, 1), val_metrics(0.1))
    make_run(tmp_path / "copy_of_a", train_cfg(LML, 1), val_metrics(0.1))
    with pytest.raises(ValueError, match=r"/a and .*/copy_of_a: both LML with seed 1 on the same users"):
        write_report([tmp_path], tmp_path / "out")


def test_report_compares_only_the_same_users(tmp_path):
    """LML on rows 0-9, MSL on rows 0-19 of the same split: two contexts, no percentage and no paired
    comparison between them (old: MSL +x% and a paired test on the 10 shared rows). A popularity
    baseline (its own config: another backbone) joins LML's context, where it is compared."""
    from experiments.report import write_report

    lml_train = make_run(tmp_path / "train" / "lml", train_cfg(LML, 1))
    msl_train = make_run(tmp_path / "train" / "msl", train_cfg(MSL, 1))
    make_eval(tmp_path / "eval" / "lml", lml_train, [0] + [-1] * 9, list(range(10)))
    make_eval(tmp_path / "eval" / "msl", msl_train, [0] * 5 + [-1] * 15, list(range(20)))
    make_eval(tmp_path / "eval" / "popularity", None, [-1, 0, 0] + [-1] * 7, list(range(10)),
              decoder="popularity")
    text = write_report([tmp_path / "eval"], tmp_path / "out").read_text()
    assert "Failed or unfinished" not in text  # the training folders have no metrics.json, but are used
    ten = section(text, "## C1. books / tiny_llama / cbs_masked / valid rows 0-9, users #")
    twenty = section(text, "## C2. books / tiny_llama / cbs_masked / valid rows 0-19, users #")
    assert "| LML | 1 | 10 | 0.1000 |" in ten and "| popularity | 1 | 10 | 0.2000 (+100.0%) |" in ten
    assert "| MSL (tau=1.5) | 1 | 20 | 0.2500 |" in twenty and "%" not in twenty
    paired = section(text, "## Paired comparison with LML (same users): C1")
    assert "| popularity | ndcg@10 | 10 |" in paired and "MSL" not in paired
    assert "Paired comparison with LML (same users): C2" not in text


def test_report_lists_failed_and_unfinished_runs(tmp_path):
    """A failed sweep job (failed.json, with the metrics.json of its last validation), and one with a
    config but no metrics.json: listed, printed, and kept out of the tables (old: the failed job's
    metrics in the LML row, the unfinished one not mentioned)."""
    make_run(tmp_path / "0", train_cfg(LML, 1), val_metrics(0.1))
    make_run(tmp_path / "1", train_cfg(LML, 2), val_metrics(0.9))
    failure = {"error": "non-finite loss at step 12", "type": "FloatingPointError",
               "overrides": ["seed=2", "optim.lr=1"]}
    (tmp_path / "1" / "failed.json").write_text(json.dumps(failure))
    make_run(tmp_path / "2", train_cfg(LML, 3))
    (tmp_path / "2" / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["seed=3"]))
    report = [sys.executable, "-m", "experiments.report", str(tmp_path)]
    proc = subprocess.run([*report, "--out", str(tmp_path / "out")], check=False, cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    failed = section(proc.stdout, "## Failed or unfinished runs (2)")
    assert (f"| `{tmp_path / '1'}` | failed | FloatingPointError: non-finite loss at step 12 | "
            "seed=2 optim.lr=1 |") in failed
    assert f"| `{tmp_path / '2'}` | unfinished | no metrics.json" in failed and "| seed=3 |" in failed
    assert "| LML | 1 | 64 | 0.1000 |" in proc.stdout
    assert f"failed run {tmp_path / '1'}" in proc.stderr and f"unfinished run {tmp_path / '2'}" in proc.stderr
    assert "## Failed or unfinished runs (2)" in (tmp_path / "out" / "results.md").read_text()
    # nothing finished: an error that still names them
    (tmp_path / "0" / "metrics.json").unlink()
    proc = subprocess.run(report, check=False, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "no finished runs" in proc.stderr and "FloatingPointError" in proc.stderr


@pytest.mark.parametrize(("name", "content", "kind"), [
    ("metrics.json", '{"ndcg@5": 0.1, "ndcg@1', "not valid JSON"),
    ("metrics.json", "", "not valid JSON"),
    (".hydra/config.yaml", "loss: {_target_: [", "not valid YAML"),
    (".hydra/config.yaml", "", "expected a YAML mapping, found NoneType"),
])
def test_report_names_a_truncated_file(tmp_path, name, content, kind):
    from experiments.report import write_report

    run = make_run(tmp_path / "run", train_cfg(LML, 1), val_metrics(0.1))
    (run / name).write_text(content)
    fix = rf"re-run or re-evaluate that run \(or remove its folder {re.escape(str(run))}\)"
    with pytest.raises(ValueError, match=rf"{re.escape(str(run / name))}: {kind}.*{fix}"):
        write_report([tmp_path], tmp_path / "out")


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(folder.rglob("*"))}


SMALL_PLAN = ['train=["backbone=tiny_llama"]', "eval.users=4"]


def compare_cfg(root: Path, *overrides: str):
    """A comparison job's config (experiments/configs/compare_cpu.yaml) with ``out=root``."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(PROJECT_ROOT / "experiments" / "configs")):
        return compose("compare_cpu", [f"out={root}", *SMALL_PLAN, *overrides])


def fake_finished_comparison(root: Path) -> None:
    """The outputs of a finished comparison with SMALL_PLAN (a tau sweep of tau 1, three losses and
    popularity), each run with the overrides its job gives it: the jobs find everything done."""
    import torch

    from experiments.compare import plan_runs

    points = [("stage=sweep", "tau=1.0")] + [("stage=final", f"model={m}") for m in ("lml", "msl", "msl_ats", "popularity")]
    for point in points:
        train, (eval_dir, eval_args) = plan_runs(compare_cfg(root, *point))
        if train is not None:
            loss = {"msl": MSL, "msl_ats": LML | {"tau": 2.0}}.get(train[0].name, LML)
            run = make_run(train[0], train_cfg(loss, 42))
            (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(train[1]))
            (run / "checkpoints").mkdir()
            torch.save({"state_dict": {"w": torch.zeros(2)}}, run / "checkpoints" / "last.ckpt")
        make_eval(eval_dir, None if train is None else train[0], [0, -1, -1, -1], [0, 1, 2, 3],
                  decoder="cbs_masked" if train else "popularity")
        (eval_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(eval_args))


def test_compare_out_writes_nothing_outside_it(tmp_path, monkeypatch):
    """With out=, the jobs, the report, adapters, tau.json and run copies stay under it (old: the report
    went into the project's results/compare_cpu, here a stand-in project root)."""
    import experiments.compare as compare_py

    committed = PROJECT_ROOT / "results"
    before = snapshot(committed)
    monkeypatch.setattr(compare_py, "PROJECT_ROOT", tmp_path / "project")
    out = tmp_path / "cmp"
    fake_finished_comparison(out)
    for model in ("lml", "msl", "msl_ats", "popularity"):
        compare_py.compare_job(compare_cfg(out, "stage=final", f"model={model}"))
    compare_py.report(compare_cfg(out, "stage=report"))
    results = out / "results"
    assert "## Paired comparison with LML (same users)" in (results / "results.md").read_text()
    assert (results / "tau_sweep" / "results.md").is_file() and (results / "tau.json").is_file()
    assert {p.name for p in results.glob("*.ckpt")} == {"lml.ckpt", "msl.ckpt", "msl_ats.ckpt"}
    assert (results / "runs" / "eval" / "lml" / "predictions.jsonl").is_file()
    assert not (tmp_path / "project").exists()
    assert snapshot(committed) == before


def test_compare_rerun_refuses_runs_made_with_other_settings(tmp_path, monkeypatch):
    """A finished job is skipped (no app runs) with the same settings; with another training or
    evaluation override it is an error naming the overrides that differ, and nothing runs (old: the
    finished runs were reused silently)."""
    import experiments.compare as compare_py

    root = tmp_path / "cmp"
    fake_finished_comparison(root)
    ran = []
    monkeypatch.setattr(compare_py, "run_app", lambda cmd, log, threads: ran.append(cmd))
    compare_py.compare_job(compare_cfg(root, "stage=final", "model=msl"))
    compare_py.compare_job(compare_cfg(root, "stage=sweep", "tau=1.0"))
    assert ran == []
    with pytest.raises(ValueError, match=rf"{re.escape(str(root / 'train' / 'lml'))} was made with other overrides "
                                         r"\(optim.lr=0.001 differ\)"):
        compare_py.compare_job(compare_cfg(root, "stage=final", "model=lml",
                                           'train=["backbone=tiny_llama","optim.lr=0.001"]'))
    with pytest.raises(ValueError, match=r"eval/popularity was made with other overrides \(subset=4, subset=5 differ\)"):
        compare_py.compare_job(compare_cfg(root, "stage=final", "model=popularity", "eval.users=5"))
    assert ran == []


def test_report_puts_sequential_models_beside_the_llm_runs(tmp_path):
    """A SASRec+DROS and a BERT4Rec run (no backbone; eval_key.json says item_scores) join the LLM's context of the
    same users, labelled by method and loss, and are compared with popularity (old: labelled by loss class, in
    contexts of their own, no comparison with popularity)."""
    from experiments.report import write_report

    rows = list(range(10))
    lml_train = make_run(tmp_path / "train" / "lml", train_cfg(LML, 1))
    make_eval(tmp_path / "eval" / "lml", lml_train, [0] + [-1] * 9, rows)
    make_eval(tmp_path / "eval" / "popularity", None, [-1] * 9 + [0], rows, decoder="popularity")
    for name, method, loss, ranks in (("dros", "sasrec", "DROSLoss", [0, 1, 0] + [-1] * 7),
                                      ("bert", "bert4rec", "CELoss", [0, 0] + [-1] * 8)):
        cfg = {**train_cfg({"_target_": f"msl_rec.losses.{loss}"}, 1), "method": {"name": method, "kind": "sequential"}}
        run = make_run(tmp_path / "train" / name, cfg)
        folder = make_eval(tmp_path / "eval" / name, run, ranks, rows)
        (folder / "eval_key.json").write_text(json.dumps({"rows": [0, 10], "decoder": {"name": "item_scores"}}))
    text = write_report([tmp_path / "eval"], tmp_path / "out").read_text()
    assert "## C2" not in text  # one context: the same users
    ctx = section(text, "## C1. books / tiny_llama / cbs_masked / valid rows 0-9")
    assert "| SASRec+DROS | 1 | 10 |" in ctx and "| BERT4Rec | 1 | 10 |" in ctx and "| LML | 1 | 10 |" in ctx
    paired = section(text, "## Paired comparison with popularity (same users): C1")
    assert "| SASRec+DROS | ndcg@10 | 10 |" in paired and "| BERT4Rec | hr@10 | 10 |" in paired


def test_report_labels_hybrid_runs_by_method_and_loss():
    """LLaRA / A-LLMRec runs are Table 5's "LLaRA+MSL", "A-LLMRec+LML" (old: "MSL", "LML", the same labels as
    BIGRec's runs, so a report of both mixed them up); BIGRec's runs keep their loss label."""
    from experiments.report import run_label

    msl, lml = {"_target_": "msl_rec.losses.MSLLoss", "tau": 1.0}, {"_target_": "msl_rec.losses.LMLLoss"}
    assert run_label({"loss": msl, "method": {"name": "llara", "kind": "hybrid"}}) == "LLaRA+MSL"
    assert run_label({"loss": lml, "method": {"name": "allmrec", "kind": "hybrid"}}) == "A-LLMRec+LML"
    assert run_label({"loss": msl, "method": {"name": "bigrec", "kind": "llm"}}) == "MSL"
    assert run_label({"loss": lml}) == "LML"


def test_report_reads_each_hybrid_loss_against_its_own_methods_lml(tmp_path):
    """LLaRA+MSL's relative change and paired comparison are against LLaRA+LML (old: against BIGRec's LML only,
    and with no BIGRec LML in the folder, no comparison at all); every model is still paired with BIGRec's LML."""
    from experiments.report import write_report

    rows = list(range(10))
    msl = {"_target_": "msl_rec.losses.MSLLoss", "tau": 1.0}
    runs = [("bigrec", "lml", LML, [0] + [-1] * 9), ("llara", "lml", LML, [1, 1] + [-1] * 8),
            ("llara", "msl", msl, [0, 0, 0] + [-1] * 7), ("allmrec", "lml", LML, [0, 3] + [-1] * 8)]
    for method, name, loss, ranks in runs:
        cfg = {**train_cfg(loss, 1), "method": {"name": method, "kind": "llm" if method == "bigrec" else "hybrid"}}
        make_eval(tmp_path / "eval" / f"{method}_{name}", make_run(tmp_path / "train" / f"{method}_{name}", cfg),
                  ranks, rows)
    text = write_report([tmp_path / "eval"], tmp_path / "out").read_text()
    ctx = section(text, "## C1.")
    llara_lml = 2 / math.log2(3) / 10  # N@5 = N@10: two hits at rank 1 of 10 users
    assert f"| LLaRA+MSL | 1 | 10 | 0.3000 ({100 * (0.3 - llara_lml) / llara_lml:+.1f}%) |" in ctx
    assert f"| LLaRA+LML | 1 | 10 | {llara_lml:.4f} ({100 * (llara_lml - 0.1) / 0.1:+.1f}%) |" in ctx  # vs LML
    own = section(text, "## Paired comparison with LLaRA+LML (same users): C1")
    assert f"| LLaRA+MSL | ndcg@10 | 10 | 1, 1 | 0.3000 | {llara_lml:.4f} |" in own
    assert "A-LLMRec" not in own and "| LML |" not in own  # only LLaRA's other losses
    assert "## Paired comparison with A-LLMRec+LML" not in text  # A-LLMRec has no other loss here
    bigrec = section(text, "## Paired comparison with LML (same users): C1")
    assert all(f"| {m} | ndcg@10 |" in bigrec for m in ("LLaRA+LML", "LLaRA+MSL", "A-LLMRec+LML"))
