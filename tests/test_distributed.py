"""Distributed paths on CPU: FSDP on two gloo processes (trainer=fsdp_sim), run folders shared by
the ranks of a torchrun/srun job, and hydra-submitit-launcher sweeps (submitit_local)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.dist_probe import probe_batch

FSDP_TIMEOUT = 600  # s: a hang in validation (decoding under FSDP) fails the test instead of blocking


@pytest.mark.slow
def test_fsdp_sim_trains_validates_checkpoints_and_reloads(tmp_path, tiny_overrides, cli):
    """FSDP (2 CPU ranks, gloo): 2 MSL+ATS steps, beam-search validation, an adapter-only checkpoint
    that reloads in one process to the trained model's logits, and the same tau on both ranks."""
    from msl_rec.models.module import RecLitModule

    cli("msl_rec.train", *tiny_overrides, "trainer=fsdp_sim", "loss=msl_ats", "decoder=cbs_masked",
        "trainer.max_steps=2", "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
        "callbacks.model_summary=null", "+callbacks.probe._target_=tests.dist_probe.LogitProbe",
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
    assert set(state) == set(lora) | {"loss.tau_ema", "loss.step"}

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
