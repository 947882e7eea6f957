"""Distributed paths on CPU: FSDP on two gloo processes (trainer=fsdp_sim), run folders shared by
the ranks of a torchrun/srun job, and hydra-submitit-launcher sweeps (submitit_local)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from experiments.probes import probe_batch
from msl_rec.models.fsdp_utils import AdapterFSDPStrategy
from msl_rec.train import build_strategy
from msl_rec.training.module import RecLitModule
from msl_rec.utils.config import CONFIG_DIR, PROJECT_ROOT, run_id

FSDP_TIMEOUT = 600  # s: a hang in validation (decoding under FSDP) fails the test instead of blocking


@pytest.mark.slow
def test_fsdp_sim_trains_validates_checkpoints_and_reloads(tmp_path, tiny_overrides, cli):
    """FSDP (2 CPU ranks, gloo): 2 MSL+ATS steps, beam-search validation, an adapter-only checkpoint
    that reloads in one process to the trained model's logits, and the same tau on both ranks."""

    cli("msl_rec.train", *tiny_overrides, "trainer=fsdp_sim", "optim.global_batch_size=4", "loss=msl_ats",
        "decoder=cbs_masked",
        "trainer.max_steps=2", "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
        "callbacks.model_summary=null", "+callbacks.probe._target_=experiments.probes.LogitProbe",
        f"+callbacks.probe.dirpath={tmp_path}", f"hydra.run.dir={tmp_path}", timeout=FSDP_TIMEOUT)

    # validation ran the constrained beam search on both ranks (no hang) and produced ranking metrics
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert {"ndcg@10", "hr@10"} <= set(metrics) and metrics["step"] == 2

    # the checkpoint keeps the LoRA weights (names without FSDP's prefixes) and the ATS state, nothing else
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    lora = [k for k in state if "lora_" in k]
    assert len(lora) == 8  # 2 layers x (q_proj, v_proj) x (A, B)
    assert all(k.startswith("model.base_model.") and "_fsdp" not in k for k in lora)
    rest = set(state) - set(lora)
    assert {"loss.tau_ema", "loss.step"} <= rest and all(k.startswith("loss.") for k in rest)

    # the same tau on both ranks, and the checkpoint carries it
    ranks = [json.loads((tmp_path / "rank_state" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1] and ranks[0]["step"] == 2
    assert state["loss.tau_ema"].item() == pytest.approx(ranks[0]["tau_ema"])

    # reloaded in one process (no strategy): the trained (sharded) model's logits, bit for bit
    probe = torch.load(tmp_path / "probe.pt", weights_only=True)
    ids, am = probe_batch()
    reloaded = RecLitModule.load_from_checkpoint(ckpt).eval()
    with torch.no_grad():
        got = reloaded(ids, am)
        with reloaded.model.disable_adapter():
            base = reloaded(ids, am)
    assert not torch.allclose(probe["trained"], base, atol=1e-6)  # the steps moved the adapter
    torch.testing.assert_close(got, probe["trained"], rtol=0, atol=1e-6)
    # validation decoded with exactly these weights (the rank-local unsharded copy)
    torch.testing.assert_close(probe["decoding_copy"], probe["trained"], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------- run folder per job
def test_run_folder_is_a_timestamp_for_one_process():

    t = datetime(2026, 1, 2, 3, 4, 5, 678901)
    assert run_id({}, now=t) == "2026-01-02_03-04-05_678901"
    # Lightning's own launcher: ranks > 0 get hydra.run.dir pinned; rank 0 composes before the env is set
    assert run_id({"LOCAL_RANK": "1", "WORLD_SIZE": "2"}, now=t) == "2026-01-02_03-04-05_678901"
    # an sbatch script's single process (no srun step with several tasks): a timestamp, never a folder
    # shared by every run of the allocation
    assert run_id({"SLURM_JOB_ID": "77", "SLURM_NTASKS": "1"}, now=t) == "2026-01-02_03-04-05_678901"


def _srun_env(rank: int) -> dict[str, str]:
    return {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4",
            "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank % 2), "SLURM_NODEID": str(rank // 2)}


def _torchrun_env(rank: int, run: str = "3f2a") -> dict[str, str]:
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": run}


def test_run_folder_is_shared_by_every_rank_of_an_srun_or_torchrun_job():

    t0 = datetime(2026, 1, 2, 3, 4, 5)
    # ranks start at different times; their folder name must not depend on it
    srun = {run_id(_srun_env(r), now=t0 + timedelta(seconds=r)) for r in range(4)}
    assert srun == {"slurm-4242.0"}
    assert run_id({**_srun_env(0), "SLURM_STEP_ID": "1"}) == "slurm-4242.1"  # a second srun in the job
    torchrun = {run_id(_torchrun_env(r), now=t0 + timedelta(seconds=r)) for r in range(2)}
    assert torchrun == {"torchrun-3f2a"}
    assert run_id({**_torchrun_env(1), "MSL_REC_RUN_ID": "exp7"}) == "exp7"


def test_run_folder_without_a_shared_job_id_is_an_error():
    with pytest.raises(ValueError, match="MSL_REC_RUN_ID"):
        run_id(_torchrun_env(1, run="none"))  # torchrun --nnodes=2 without --rdzv-id


def test_srun_ranks_compose_one_run_dir(monkeypatch):
    """The composed hydra.run.dir (what each rank's Hydra makes) is the same for every srun rank."""

    dirs = set()
    for rank in range(2):
        for k, v in _srun_env(rank).items():
            monkeypatch.setenv(k, v)
        with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
            cfg = compose("train.yaml", ["backbone=tiny_llama", "trainer=ddp", "trainer.devices=2"],
                          return_hydra_config=True)
            OmegaConf.resolve(cfg.hydra.run)  # hydra.run.dir needs no HydraConfig: only paths + run_id
            dirs.add(cfg.hydra.run.dir)
        GlobalHydra.instance().clear()
    assert len(dirs) == 1 and next(iter(dirs)).endswith("/train/runs/slurm-4242.0")


# ---------------------------------------------------------------------------- cluster sweeps
def test_slurm_launcher_config_asks_one_task_per_gpu():
    """hydra/launcher=slurm composes with trainer=ddp: nodes, GPUs and tasks follow the trainer."""

    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        cfg = compose("train.yaml", ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4",
                                     "trainer.num_nodes=2", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (2, 4, 4)
    assert launcher.partition == "gpu" and launcher.timeout_min == 720


@pytest.mark.slow
def test_submitit_local_sweep_runs_both_jobs(tmp_path, tiny_overrides, cli):
    """A 2-job multirun through hydra-submitit-launcher's local executor: both jobs train, validate
    and write their metrics in one sweep folder named once by the launching process."""

    cli("msl_rec.train", "-m", *tiny_overrides, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
        "loss=lml,msl", "trainer.max_epochs=1", "trainer.limit_train_batches=1", "data.valid_subset=2",
        "callbacks.model_summary=null", f"paths.log_dir={tmp_path}", timeout=600)
    sweeps = list((tmp_path / "train" / "multiruns").iterdir())
    assert len(sweeps) == 1, sweeps  # the jobs did not re-name the sweep folder
    sweep = sweeps[0]
    assert sorted(p.name for p in sweep.iterdir() if p.name.isdigit()) == ["0", "1"]
    losses = set()
    for job in ("0", "1"):
        assert (sweep / job / "metrics.json").is_file()
        assert "ndcg@10" in json.loads((sweep / job / "metrics.json").read_text())
        losses.add(OmegaConf.load(sweep / job / ".hydra" / "config.yaml").loss._target_.rsplit(".", 1)[-1])
    assert len(losses) == 2  # one job per loss
    assert list(sweep.glob(".submitit/*/*_result.pkl"))  # submitit ran them, not the basic launcher


# ---------------------------------------------------------------------------- make gpu-check
def test_gpu_check_without_cuda_says_so_and_fails():

    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "experiments.gpu_check"], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr


def test_fsdp_gpu_config_keeps_buffers_in_their_own_dtype():
    """trainer=fsdp: bf16 compute, float32 gradient reduction, buffers not cast (Lightning's bf16-mixed
    alone would give FSDP buffer_dtype=bf16 and round ATS's tau EMA)."""

    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        cfg = compose("train.yaml", ["trainer=fsdp", "trainer.devices=1"])
    strategy = build_strategy(OmegaConf.to_container(cfg.trainer.strategy, resolve=True))
    assert type(strategy) is AdapterFSDPStrategy
    assert strategy.lightning_module_state_dict() == {}  # no full-model gather: on_save_checkpoint writes the adapter
    mp = strategy.mixed_precision_config
    assert (mp.param_dtype, mp.reduce_dtype, mp.buffer_dtype) == (torch.bfloat16, torch.float32, None)
    assert strategy.kwargs["use_orig_params"] is True
    assert LlamaDecoderLayer in strategy.kwargs["auto_wrap_policy"]._module_classes
