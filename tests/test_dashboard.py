"""The wandb dashboard of a run (README "Dashboards"), read back from the offline run's own ``.wandb`` log."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from msl_rec.data.io import read_samples
from msl_rec.utils.wandb_files import read_records
from tests.conftest import TINY, compose


def _finished_records(path: Path, timeout: float = 60.0) -> list:
    """The records of a wandb run file once its last one is ``exit`` (a file still being written may also end
    in a partial record, which the reader refuses: read again)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            records = read_records(path)
        except ValueError:
            records = []
        if records and records[-1].WhichOneof("record_type") == "exit":
            return records
        assert time.monotonic() < deadline, f"{path}: no exit record after {timeout:g} s (the run did not finish)"
        time.sleep(0.2)


class OfflineRun:
    """What an offline run logged: its run record, config, final summary and history rows."""

    def __init__(self, run_dir: Path):
        logs = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
        assert len(logs) == 1, f"expected one offline wandb run under {run_dir}/wandb, found {logs}"
        self.files = logs[0].parent / "files"
        self.run, self.config, self.summary, self.history, self.metrics = None, {}, {}, [], []
        # wandb.finish() can return before wandb-core has written the file out (offline): read it once it holds
        # the run's last record, `exit` (before, the test read a half-written file in ~1 of 10 runs)
        records = _finished_records(logs[0])
        for r in records:  # the project's reader (wandb 0.31 has none in Python)
            kind = r.WhichOneof("record_type")
            if kind == "run":
                self.run = r.run
                self.config.update({u.key: json.loads(u.value_json) for u in r.run.config.update})
            elif kind == "config":
                self.config.update({u.key: json.loads(u.value_json) for u in r.config.update})
            elif kind == "summary":
                for u in r.summary.update:
                    self.summary["/".join(u.nested_key) or u.key] = json.loads(u.value_json)
            elif kind == "history":
                self.history.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item})
            elif kind == "metric":
                self.metrics.append(r.metric)


def test_run_identity_names_what_varies(tmp_path):
    """name: dataset/backbone/loss + value overrides (seed last); group: without the seed; tags: the parts."""
    from msl_rec.utils.logging_utils import override_parts, run_identity

    cfg = compose("train.yaml", ["data.train_subset=100", "seed=2", "loss=msl", "loss.tau=1.5", "logger=wandb",
                                 "trainer.devices=1", "data.num_workers=2"], tmp_path)
    identity = run_identity(cfg)
    assert identity["name"] == "books/smollm2_135m/msl/tau=1.5/seed=2/train_subset=100"
    assert identity["group"] == "books/smollm2_135m/msl/tau=1.5/train_subset=100"
    assert identity["tags"][:4] == ["books", "smollm2_135m", "msl", "cbs_masked"] and identity["job_type"] == "train"
    # a path value by its file name, '/' elsewhere as ':', keys that share a last component in full
    assert override_parts(["dataset.train_file=/data/b/train.csv", "monitor.metric=val/hr@10", "a.x=1", "b.x=2"],
                          groups={}) == ["train_file=train.csv", "metric=val:hr@10", "a.x=1", "b.x=2"]
    many = [f"+optim.k{i}=0.000{i}" for i in range(30)]
    assert run_identity(compose("train.yaml", [*many, "seed=1"], tmp_path))["name"] != run_identity(
        compose("train.yaml", [*many, "seed=2"], tmp_path))["name"]  # cut names stay distinct


def test_user_set_wandb_name_group_and_tags_win(tmp_path):
    from msl_rec.utils.logging_utils import RUN_FILE, _prepare_wandb

    cfg = compose("train.yaml", ["logger=wandb", "logger.wandb.name=mine", "logger.wandb.tags=[a]"], tmp_path)
    _prepare_wandb(cfg.logger.wandb, tmp_path, {"name": "derived", "group": "g", "tags": ["t"], "job_type": "train"})
    assert (cfg.logger.wandb.name, list(cfg.logger.wandb.tags), cfg.logger.wandb.group) == ("mine", ["a"], "g")
    assert json.loads((tmp_path / RUN_FILE).read_text())["name"] == "mine"
    # a resumed run (its folder has a wandb id) keeps the name it was given
    cfg = compose("train.yaml", ["logger=wandb"], tmp_path)
    _prepare_wandb(cfg.logger.wandb, tmp_path, {"name": "new", "group": "g2", "tags": ["t"], "job_type": "train"})
    assert cfg.logger.wandb.name == "mine" and cfg.logger.wandb.id == (tmp_path / "wandb_id.txt").read_text()


class _FakeRun:
    def __init__(self):
        self.logged: list[dict] = []

    def log(self, record: dict) -> None:
        self.logged.append(record)


def _fake_trainer(rows: list[tuple[int, tuple[int, ...], int]]):
    """A trainer as the dashboard sees it: validation rows (user, history, target), titles 'T<id>'."""
    samples = [SimpleNamespace(user_id=u, history=h, target=t) for u, h, t in rows]
    dm = SimpleNamespace(catalog=SimpleNamespace(titles={i: f"T{i}" for i in range(100)}),
                         eval_samples=lambda split: samples if split == "valid" else None)
    return SimpleNamespace(sanity_checking=False, datamodule=dm, global_step=7, current_epoch=1,
                           val_dataloaders=SimpleNamespace(sampler=range(len(rows))))


def _prediction(user: int, target: int, rank: int, ranked: list[int]) -> dict:
    return {"user_id": user, "target_id": target, "rank": rank, "ranked_ids": [[i] for i in ranked],
            "scores": [-0.5 * j - 0.25 for j in range(len(ranked))], "target_logp": -3.0}


def test_dashboard_table_and_rank_histogram_from_prediction_rows():
    """Two batches of prediction rows: the table holds the first two users (sample_users=2), the
    histogram one bin per rank of the ranked targets, the unranked ones counted apart."""
    from msl_rec.utils.dashboard import RANK_KEY, TABLE_KEY, WandbDashboard

    trainer = _fake_trainer([(10, (1, 2, 3, 4), 5), (11, (6,), 7), (12, (8, 9), 20)])
    cb = WandbDashboard(sample_users=2, history_titles=3, top_titles=2)
    cb._run = run = _FakeRun()
    cb.on_validation_epoch_start(trainer, None)
    cb.on_validation_batch_end(trainer, None, [_prediction(10, 5, 0, [5, 30, 31, 32]),
                                               _prediction(11, 7, 3, [40, 41, 42, 7])], {"user_ids": [10, 11]}, 0)
    cb.on_validation_batch_end(trainer, None, [_prediction(12, 20, -1, [5, 6, 7, 8])], {"user_ids": [12]}, 1)
    cb.on_validation_epoch_end(trainer, None)
    (record,) = run.logged
    assert record["trainer/global_step"] == 7
    assert record["val_samples/users"] == 3 and record["val_samples/not_ranked"] == 1
    assert record[RANK_KEY].histogram == [1, 0, 0, 1] and list(record[RANK_KEY].bins) == [0, 1, 2, 3, 4]
    table = record[TABLE_KEY]
    assert table.columns[-2:] == ["target rank", "hit@2"]
    assert table.data == [[1, 0, 10, "T2 | T3 | T4", "T5", "1. T5 (-0.250)\n2. T30 (-0.750)", 0, True],
                          [1, 1, 11, "T6", "T7", "1. T40 (-0.250)\n2. T41 (-0.750)", 3, False]]


def test_dashboard_logs_nothing_without_prediction_rows_and_refuses_a_mismatch():
    from msl_rec.utils.dashboard import WandbDashboard

    trainer = _fake_trainer([(10, (1,), 5)])
    cb = WandbDashboard()
    cb._run = run = _FakeRun()
    cb.on_validation_epoch_start(trainer, None)
    cb.on_validation_batch_end(trainer, None, None, {"user_ids": [10]}, 0)  # a module that returns nothing
    cb.on_validation_epoch_end(trainer, None)
    assert run.logged == []
    cb.on_validation_epoch_start(trainer, None)
    cb.on_validation_batch_end(trainer, None, [_prediction(99, 5, 0, [5])], {"user_ids": [10]}, 0)
    with pytest.raises(RuntimeError, match="validation row 0 is user 10"):
        cb.on_validation_epoch_end(trainer, None)


def _tiny(*extra: str) -> list[str]:
    return [o for o in TINY if not o.startswith("logger=")] + ["logger=wandb", *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-epoch tiny MSL+ATS run with logger=wandb (offline): (run folder, metrics.json)."""
    from msl_rec.train import train

    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    out = tmp_path_factory.mktemp("train")
    try:
        # val/target_logp with mode=min selects the worse epoch, epoch 0 here: the selected epoch is not
        # the last one, so a summary holding the last epoch's values fails the test. Two validation
        # users, five beams and one sample user keep it fast.
        cfg = compose("train.yaml", _tiny("loss=msl_ats", "trainer.max_epochs=2", "seed=3", "callbacks.model_summary=null",
                                          "data.valid_subset=2", "decoder.num_beams=5", "top_k=[1,5]",
                                          "monitor.metric=val/target_logp", "monitor.mode=min",
                                          "callbacks.dashboard.sample_users=1"), out)
        train(cfg)
        (out / ".hydra").mkdir()
        OmegaConf.save(cfg, out / ".hydra" / "config.yaml")  # what the Hydra app saves; run_dir= reads it
    finally:
        mp.undo()
    return out, json.loads((out / "metrics.json").read_text())


def test_training_run_is_named_summarised_and_shows_recommendations(trained):
    out, best = trained
    run = OfflineRun(out)
    # named after what varies (cut to wandb's 128 characters with a hash of the rest), tagged with the
    # loss; the name and group recorded for eval runs
    name = run.run.display_name
    prefix = "books/tiny_llama/msl_ats/global_batch_size=2/warmup_steps=1/num_beams=5/top_k=[1,5]/"
    assert name.startswith(prefix) and len(name) <= 128 - 16, name  # room for "/eval-<split>"
    assert run.run.run_group.startswith(prefix) and run.run.run_group != name
    assert {"books", "tiny_llama", "msl_ats", "cbs_masked"} <= set(run.run.tags)
    assert json.loads((out / "wandb_run.json").read_text())["name"] == run.run.display_name
    assert run.run.job_type == "train"
    # the full resolved config, also as files/config.yaml
    for key in ("dataset", "backbone", "loss", "optim", "decoder", "monitor", "data"):
        assert key in run.config, key
    assert run.config["loss"]["_target_"] == "msl_rec.losses.MSLATSLoss" and run.config["optim"]["lr"] == 1e-4
    assert "optim:" in (run.files / "config.yaml").read_text()
    # the summary holds the selected epoch's values (metrics.json), not the last epoch's
    monitor = best["monitor"]["metric"]
    assert monitor == "val/target_logp" and best["epoch"] == 0
    last_epoch = [h[monitor] for h in run.history if monitor in h]
    assert len(last_epoch) == 2 and last_epoch[-1] != pytest.approx(best["target_logp"])
    for key in ("target_logp", "hr@5", "ndcg@1"):
        assert run.summary[f"val/{key}"] == pytest.approx(best[key]), key
    assert run.summary["selected/epoch"] == 0 and run.summary["selected/step"] == best["step"]
    # train and val metrics on the step axis; ATS's tau and the invalid-token mass among them
    axes = {m.glob_name: m.step_metric for m in run.metrics if m.glob_name}
    assert axes["train/*"] == axes["val/*"] == "trainer/global_step"
    steps = [h["trainer/global_step"] for h in run.history if "train/tau" in h]
    assert len(steps) == 8 and steps == sorted(steps)  # 2 epochs x 4 optimizer steps
    assert any("train/invalid_mass" in h for h in run.history)
    # each validation: the table of the fixed user's recommendations and the target-rank counts
    tables = [h for h in run.history if "val_samples/recommendations/path" in h]
    assert len(tables) == 2 and all(h["val_samples/users"] == 2 for h in tables)
    assert all(h["val_samples/recommendations/nrows"] == 1 for h in tables)  # sample_users=1
    table = json.loads((run.files / tables[-1]["val_samples/recommendations/path"]).read_text())
    assert table["columns"] == ["epoch", "row", "user_id", "history (last 3)", "target", "top 5 (score)",
                                "target rank", "hit@5"]
    (epoch, row, _user, history, target, top, rank, hit), = table["data"]
    assert (epoch, row) == (1, 0) and history.count(" | ") == 2 and target
    assert top.startswith("1. ") and len(top.splitlines()) == 5 and hit == (0 <= rank < 5)


def test_eval_run_joins_the_training_run_group(trained, tmp_path, monkeypatch):
    from msl_rec.eval import evaluate_app

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train_dir, _ = trained
    trained_run = OfflineRun(train_dir).run
    cfg = compose("eval.yaml", ["backbone=tiny_llama", "logger=wandb", f"run_dir={train_dir}", "subset=2",
                                "scoring.num_negatives=0"], tmp_path)
    metrics, _ = evaluate_app(cfg)
    run = OfflineRun(tmp_path)
    assert run.run.display_name == f"{trained_run.display_name}/eval-valid"
    assert run.run.run_group == trained_run.run_group and run.run.job_type == "eval"
    assert run.config["train_run"]["id"] == trained_run.run_id
    assert run.config["eval"]["n_users"] == 2 and run.summary["n_users"] == 2 and run.summary["split"] == "valid"
    assert run.summary["valid/ndcg@10"] == pytest.approx(metrics["valid/ndcg@10"])


def test_a_sequential_run_gets_the_same_dashboard(tmp_path, monkeypatch):
    """method=sasrec with logger=wandb (offline): the recommendation table is built from its validation rows."""
    from msl_rec.train import train
    from msl_rec.utils.dashboard import WandbDashboard

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    tables = []
    log_table = WandbDashboard._table
    monkeypatch.setattr(WandbDashboard, "_table", lambda self, trainer: tables.append(log_table(self, trainer))
                        or tables[-1])
    cfg = compose("train.yaml", _tiny("method=sasrec", "data.train_subset=64", "data.valid_subset=4",
                                      "data.micro_batch_size=32", "optim.global_batch_size=32", "trainer.max_epochs=1",
                                      "callbacks.dashboard.sample_users=2"), tmp_path)
    train(cfg)
    assert len(tables) == 1 and len(tables[0].data) == 2
    assert [row[2] for row in tables[0].data] == [s.user_id for s in read_samples(cfg.dataset.valid_file)[:2]]


def test_a_sequential_run_is_named_by_its_method_not_a_backbone(tmp_path):
    from msl_rec.utils.logging_utils import run_identity

    identity = run_identity(compose("train.yaml", ["method=sasrec", "loss=dros", "seed=2", "logger=wandb"], tmp_path))
    assert identity["name"] == "books/sasrec/dros/seed=2" and "smollm2_135m" not in identity["tags"]
