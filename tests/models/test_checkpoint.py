"""Checkpoint contents and loading: canonical adapter keys, strict key checks, weights_only safety,
the backbone record, SFT adapters, per-rank RNG state (msl_rec/models/checkpoint.py)."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from msl_rec.eval import evaluate_app
from msl_rec.models import checkpoint as C
from msl_rec.training.module import RecLitModule
from msl_rec.utils.config import CONFIG_DIR, PROJECT_ROOT
from tests.conftest import compose


def _yaml(group: str, name: str):
    """A config group option as written, without its defaults list (its schema is checked at compose)."""
    node = OmegaConf.load(f"{CONFIG_DIR}/{group}/{name}.yaml")
    node.pop("defaults", None)
    return node


def _cfg(group: str, name: str, **over) -> dict:
    return OmegaConf.to_container(OmegaConf.merge(_yaml(group, name), over))


def _module(loss: str = "msl_ats", **backbone_over) -> RecLitModule:
    backbone = _cfg("backbone", "tiny_llama", **backbone_over)
    # the loss node interpolates the backbone's settings (ATS stats_at), as in a composed config
    loss_cfg = OmegaConf.create({"backbone": backbone, "loss": _yaml("loss", loss)})
    m = RecLitModule(backbone=backbone, loss=OmegaConf.to_container(loss_cfg, resolve=True)["loss"])
    m.configure_model()
    with torch.no_grad():  # a trained-looking adapter (B = 0 at init would make every check trivial)
        for n, p in m.model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.1)
    if hasattr(m.loss, "tau_ema"):
        m.loss.tau_ema.fill_(2.75)
    return m


def _save(module: RecLitModule, path: Path) -> dict:
    """What Trainer.save_checkpoint writes, minus the trainer state."""
    ckpt = {"state_dict": {}, "hyper_parameters": dict(module.hparams), "pytorch-lightning_version": L.__version__}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return ckpt


IDS = torch.tensor([[5, 6, 7, 8, 9]])
MASK = torch.ones_like(IDS)


def test_canonical_key_strips_wrappers():
    peft = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    want = "model." + peft
    fsdp = ("model._fsdp_wrapped_module.base_model.model.model.layers.0._fsdp_wrapped_module."
            "_checkpoint_wrapped_module.self_attn.q_proj.lora_A.default.weight")
    assert C.canonical_key(fsdp) == want
    assert C.canonical_key("module." + want) == want  # DDP
    assert C.canonical_key("_orig_mod." + want) == want  # torch.compile
    assert C.canonical_key(want) == want
    assert C.canonical_key("loss.module.x") == "loss.module.x"  # only a leading `module.` is a wrapper


def test_adapter_checkpoint_round_trip(tmp_path):
    m = _module()
    ckpt = _save(m, tmp_path / "a.ckpt")
    trainable = {n for n, p in m.model.named_parameters() if p.requires_grad}
    assert set(ckpt["state_dict"]) == {"model." + n for n in trainable} | {"loss." + n for n, _ in m.loss.named_buffers()}
    assert all("lora_" in k or k.startswith("loss.") for k in ckpt["state_dict"])  # no frozen base
    assert ckpt["adapter"]["backbone"] == "tiny_llama"
    assert ckpt["adapter"]["shapes"] == {k: list(v.shape) for k, v in ckpt["state_dict"].items()}
    torch.load(tmp_path / "a.ckpt", weights_only=True)  # plain data only

    got = RecLitModule.load_from_checkpoint(tmp_path / "a.ckpt")
    m.eval(), got.eval()
    with torch.no_grad():
        torch.testing.assert_close(got(IDS, MASK), m(IDS, MASK), rtol=0, atol=0)
    assert float(got.loss.tau_ema) == 2.75


def test_wrapper_prefixed_keys_load_and_mismatched_keys_are_named(tmp_path):
    m = _module()
    ckpt = _save(m, tmp_path / "a.ckpt")
    state = ckpt["state_dict"]
    # the same adapter saved with FSDP / DDP names loads to the same weights
    wrapped = {("module." + k).replace(".layers.0.", ".layers.0._fsdp_wrapped_module."): v for k, v in state.items()}
    fresh = RecLitModule(backbone=m.hparams.backbone, loss=m.hparams.loss)
    fresh.load_state_dict(wrapped)
    for n, p in fresh.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, dict(m.model.named_parameters())[n], rtol=0, atol=0)

    key = next(k for k in state if "lora_A" in k)
    dropped = {k: v for k, v in state.items() if k != key}
    torch.save({**ckpt, "state_dict": dropped}, tmp_path / "missing.ckpt")
    with pytest.raises(C.CheckpointError, match="missing") as e:
        RecLitModule.load_from_checkpoint(tmp_path / "missing.ckpt")
    assert key in str(e.value) and "missing.ckpt" in str(e.value)

    renamed = {k.replace("lora_A.default", "lora_A.other"): v for k, v in state.items()}
    with pytest.raises(C.CheckpointError, match="unexpected") as e:
        fresh.load_state_dict(renamed)
    assert "lora_A.other" in str(e.value)


def _committed_adapter(name: str) -> Path:
    """A committed comparison adapter (SmolLM2-135M, LoRA r=8 on q/v) in results/compare_cpu/."""
    path = PROJECT_ROOT / "results" / "compare_cpu" / f"{name}.ckpt"
    if not path.is_file():
        pytest.fail(f"no committed adapter {name}.ckpt under results/compare_cpu/")
    return path


def test_committed_adapter_loads_with_identical_weights():
    # the checkpoint format is a contract: the committed comparison must re-evaluate from these files
    ckpt = C.read_checkpoint(_committed_adapter("msl_ats"))
    saved = ckpt["state_dict"]
    # built as its run was, with random base weights: the adapter does not depend on them (the GGUF
    # base would take ~30 s to dequantise)
    m = RecLitModule(backbone={**ckpt["hyper_parameters"]["backbone"], "source": "random"},
                     loss=ckpt["hyper_parameters"]["loss"])
    m.load_state_dict(saved)
    got = C.adapter_state_dict(m)
    assert set(got) == set(saved) and any(k.startswith("loss.") for k in saved)
    for k, v in saved.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    C.check_checkpoint_backbone(ckpt, m.hparams.backbone)
    # the committed LML adapter has no loss state: loaded into the MSL-ATS module, an error naming the keys
    lml = C.read_checkpoint(_committed_adapter("lml"))["state_dict"]
    with pytest.raises(C.CheckpointError, match=r"3 missing, 0 unexpected.*loss\.") as e:
        m.load_state_dict(lml)
    assert "another backbone, LoRA setting or loss" in str(e.value)


def test_checkpoint_from_another_lora_setting_is_an_error(tmp_path):
    small = _module(lora={"r": 4})
    state = C.adapter_state_dict(small)
    with pytest.raises(C.CheckpointError, match="shapes"):
        _module().load_state_dict(state)


def test_backbone_mismatch_names_both(tmp_path):
    _save(_module(), tmp_path / "tiny.ckpt")
    C.check_checkpoint_backbone(tmp_path / "tiny.ckpt", _cfg("backbone", "tiny_llama"))
    with pytest.raises(C.CheckpointError) as e:
        C.check_checkpoint_backbone(tmp_path / "tiny.ckpt", _cfg("backbone", "smollm2_135m"))
    assert "'tiny_llama'" in str(e.value) and "'smollm2_135m'" in str(e.value) and "tiny.ckpt" in str(e.value)


class _MakesAFile:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


@pytest.mark.skipif(sys.platform == "win32", reason="touch")
def test_crafted_pickle_never_runs(tmp_path):
    evil, marker = tmp_path / "evil.ckpt", tmp_path / "pwned"
    torch.save({"state_dict": {}, "x": _MakesAFile(marker)}, evil)
    for load in (C.read_checkpoint, C.sft_adapter, RecLitModule.load_from_checkpoint):
        with pytest.raises(C.CheckpointError, match="weights_only") as e:
            load(evil)
        assert str(evil) in str(e.value)
    assert not marker.exists()
    # the same file with weights_only=False does run code: the check above means something
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_text_file_or_missing_file_is_named(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("epoch 3 was the best\n")
    for load in (C.read_checkpoint, C.sft_adapter, RecLitModule.load_from_checkpoint):
        with pytest.raises(C.CheckpointError) as e:
            load(text)
        assert str(text) in str(e.value)
    with pytest.raises(C.CheckpointError, match="no such file"):
        C.read_checkpoint(tmp_path / "nope.ckpt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(C.CheckpointError, match="no 'state_dict'"):
        C.read_checkpoint(tmp_path / "other.pt")


def test_sft_checkpoint_without_lora_is_an_error(tmp_path):
    torch.save({"state_dict": {"loss.tau_ema": torch.tensor(1.5)}}, tmp_path / "nolora.ckpt")
    with pytest.raises(C.CheckpointError, match="no LoRA weights") as e:
        C.sft_adapter(tmp_path / "nolora.ckpt")
    assert "nolora.ckpt" in str(e.value)
    m = RecLitModule(backbone=_cfg("backbone", "tiny_llama"), loss=_cfg("loss", "sdpo"),
                     sft_ckpt=str(tmp_path / "nolora.ckpt"))
    with pytest.raises(C.CheckpointError):
        m.configure_model()


def test_sft_adapter_from_another_backbone_setting_is_an_error(tmp_path):
    _save(_module("lml", lora={"target_modules": ["q_proj"]}), tmp_path / "q_only.ckpt")
    m = RecLitModule(backbone=_cfg("backbone", "tiny_llama"), loss=_cfg("loss", "sdpo"),
                     sft_ckpt=str(tmp_path / "q_only.ckpt"))
    with pytest.raises(ValueError, match="q_only.ckpt does not match.*missing e.g.*v_proj"):
        m.configure_model()


def _sdpo_from(sft: Path, **backbone_over) -> RecLitModule:
    return RecLitModule(backbone=_cfg("backbone", "tiny_llama", **backbone_over), loss=_cfg("loss", "sdpo"),
                        sft_ckpt=str(sft))


def test_sft_checkpoint_of_an_lml_run_is_merged(tmp_path):
    sft = _module("lml")
    _save(sft, tmp_path / "lml.ckpt")
    dpo = _sdpo_from(tmp_path / "lml.ckpt")
    dpo.configure_model()
    sft.eval(), dpo.eval()
    with torch.no_grad(), dpo.model.disable_adapter():  # the reference is the SFT model
        torch.testing.assert_close(dpo(IDS, MASK), sft(IDS, MASK), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("loss", ["msl", "msl_ats", "sdpo"])
def test_sft_checkpoint_of_another_loss_is_refused(tmp_path, loss):
    _save(_module(loss), tmp_path / f"{loss}.ckpt")
    target = _cfg("loss", loss)["_target_"]
    with pytest.raises(C.CheckpointError, match=f"{loss}.ckpt was trained with loss {target}, not LMLLoss") as e:
        _sdpo_from(tmp_path / f"{loss}.ckpt").configure_model()
    assert "sdpo.sft_ckpt" in str(e.value)


def test_sft_checkpoint_without_a_loss_record_is_refused(tmp_path):
    ckpt = _save(_module("lml"), tmp_path / "lml.ckpt")
    del ckpt["hyper_parameters"]
    torch.save(ckpt, tmp_path / "bare.ckpt")
    with pytest.raises(C.CheckpointError, match="bare.ckpt holds no record of its loss"):
        C.sft_adapter(tmp_path / "bare.ckpt")


def test_sft_checkpoint_with_another_lora_rank_names_both(tmp_path):
    _save(_module("lml", lora={"r": 4}), tmp_path / "r4.ckpt")
    with pytest.raises(C.CheckpointError, match=r"r4.ckpt: its LoRA adapter has r=4 but backbone.lora.r=8 is "
                                                r"configured.*set backbone.lora.r=4"):
        _sdpo_from(tmp_path / "r4.ckpt").configure_model()
    _sdpo_from(tmp_path / "r4.ckpt", lora={"r": 4}).configure_model()  # the run's own rank merges


def test_sft_checkpoint_with_another_lora_alpha_names_both(tmp_path):
    _save(_module("lml", lora={"alpha": 32}), tmp_path / "a32.ckpt")
    with pytest.raises(C.CheckpointError, match=r"a32.ckpt: its run used backbone.lora.alpha=32 but "
                                                r"backbone.lora.alpha=16 is configured"):
        _sdpo_from(tmp_path / "a32.ckpt").configure_model()


def test_sft_checkpoint_of_another_backbone_names_both(tmp_path):
    ckpt = _save(_module("lml"), tmp_path / "lml.ckpt")
    ckpt["adapter"]["backbone"] = ckpt["hyper_parameters"]["backbone"]["name"] = "other_llama"
    torch.save(ckpt, tmp_path / "other.ckpt")
    with pytest.raises(C.CheckpointError, match="other.ckpt was trained with backbone 'other_llama' but the "
                                                "config names 'tiny_llama'"):
        _sdpo_from(tmp_path / "other.ckpt").configure_model()


def _draws() -> tuple:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_rng_state_round_trip_through_a_weights_only_file(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    _draws()
    torch.save({"rng_states": C.all_rng_states()}, tmp_path / "rng.pt")
    want = _draws()
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    states = torch.load(tmp_path / "rng.pt", weights_only=True)["rng_states"]
    assert len(states) == 1  # one process: one rank
    C.set_rng_state(C.rank_rng_state(states, 0, 1))
    assert _draws() == want


def test_each_rank_gets_its_own_rng_state():
    states = [{"rank": 0}, {"rank": 1}]
    assert C.rank_rng_state(states, 1, 2) == {"rank": 1}
    assert C.rank_rng_state(states, 0, 2) == {"rank": 0}
    assert C.rank_rng_state({"torch": 1}, 1, 2) == {"torch": 1}  # an older single-state checkpoint
    assert C.rank_rng_state(None, 0, 1) is None
    with pytest.raises(C.CheckpointError, match="2 ranks but this run has 4"):
        C.rank_rng_state(states, 0, 4)


def _two_ranks(rank: int, init: str, out: str) -> None:
    """One of two gloo processes: per-rank RNG gather, and the adapter state under real FSDP."""

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        torch.manual_seed(100 + rank)
        states = C.all_rng_states()

        torch.manual_seed(0)
        m = _module()
        plain = C.adapter_state_dict(m)
        wrapped = FSDP(m, auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}), use_orig_params=True,
                       device_id=torch.device("cpu"))
        with torch.no_grad():
            wrapped(IDS, MASK)  # lazy init: parameters are now views of this rank's shard
        sharded = C.adapter_state_dict(wrapped.module)
        if rank == 0:
            torch.save({"states": states, "plain": plain, "fsdp": sharded,
                        "names": [n for n, p in wrapped.module.named_parameters() if p.requires_grad]}, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_rng_states_and_fsdp_adapter_state(tmp_path):
    out = tmp_path / "r.pt"
    mp.spawn(_two_ranks, args=(f"file://{tmp_path / 'pg'}", str(out)), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    states = got["states"]
    assert len(states) == 2
    for rank in (0, 1):  # each rank's saved state reproduces that rank's draws
        C.set_rng_state(C.rank_rng_state(states, rank, 2))
        draws = torch.rand(2)
        torch.manual_seed(100 + rank)
        assert torch.equal(draws, torch.rand(2))
    torch.testing.assert_close(C.rank_rng_state(states, 0, 2)["torch"], states[0]["torch"])
    assert not torch.equal(states[0]["torch"], states[1]["torch"])
    # FSDP: wrapper names in named_parameters, the same canonical keys and full tensors in the state
    assert any("_fsdp_wrapped_module" in n for n in got["names"])
    assert set(got["fsdp"]) == set(got["plain"])
    for k, v in got["plain"].items():
        torch.testing.assert_close(got["fsdp"][k], v, rtol=0, atol=0)


@pytest.mark.slow  # ~30 s on 2 busy cores: builds the Books catalog before the check
def test_eval_app_refuses_a_checkpoint_of_another_backbone(tmp_path):
    _save(_module(), tmp_path / "tiny.ckpt")
    cfg = compose("eval.yaml", ["backbone=smollm2_135m", "logger=none", f"ckpt_path={tmp_path / 'tiny.ckpt'}",
                                "subset=2"], tmp_path / "eval")
    with pytest.raises(C.CheckpointError, match="'tiny_llama'.*'smollm2_135m'"):
        evaluate_app(cfg)
