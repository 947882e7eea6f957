"""``make gpu-check``: the GPU paths in a few minutes on one CUDA device; prints one table.

Trains SmolLM2-135M (bf16-mixed) for a few steps with each loss (lml, msl, msl_ats, then sdpo from
the lml checkpoint), then msl_ats under ``trainer=ddp`` and ``trainer=fsdp`` with ``devices=1``: each
run is the training app as a user starts it (``python -m msl_rec.train ...``), validated with
beam search and checkpointed, with the probe callback the CPU tests use
(:class:`experiments.probes.LogitProbe`: logits of the trained model, of the FSDP decoding copy, and
the peak GPU memory). The FSDP run gets the checks ``tests/test_distributed.py`` makes under
``trainer=fsdp_sim``: adapter-only checkpoint with every LoRA key, reloaded in this process to the
trained model's logits (within bf16 rounding), decoding copy = trained model. Last, the decoding
speed of ``cbs_masked`` (users/s) on the msl_ats checkpoint, as ``msl-rec-eval`` runs it.

Exit status 0 when every check passes, 1 when one fails, 2 without a CUDA device.
Extra arguments are Hydra overrides for every training run, e.g. ``dataset=office``.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

STEPS = 4           # optimizer steps per training run
MICRO_BATCH = 4
EVAL_USERS = 64     # users decoded for the users/s figure
TRAIN_RUNS = [      # (row name, overrides)
    ("lml", ["loss=lml", "trainer=gpu"]),
    ("msl", ["loss=msl", "trainer=gpu"]),
    ("msl_ats", ["loss=msl_ats", "trainer=gpu"]),
    ("sdpo", ["loss=sdpo", "trainer=gpu"]),  # + sdpo.sft_ckpt=<lml checkpoint>
    ("ddp x1 msl_ats", ["loss=msl_ats", "trainer=ddp", "trainer.devices=1"]),
    ("fsdp x1 msl_ats", ["loss=msl_ats", "trainer=fsdp", "trainer.devices=1"]),
]


def train_overrides(run_dir: Path) -> list[str]:
    return ["backbone=smollm2_135m", "logger=csv", "data.train_subset=64", "data.valid_subset=16",
            f"data.micro_batch_size={MICRO_BATCH}", "data.eval_batch_size=8",
            f"optim.global_batch_size={MICRO_BATCH}", "optim.warmup_steps=1",
            f"trainer.max_steps={STEPS}", "trainer.max_epochs=1", f"trainer.limit_train_batches={STEPS}",
            "trainer.limit_val_batches=1", "callbacks.model_summary=null", "extras.print_config=false",
            "+callbacks.probe._target_=experiments.probes.LogitProbe", f"+callbacks.probe.dirpath={run_dir}",
            f"hydra.run.dir={run_dir}"]


def last_train_loss(run_dir: Path) -> float:
    rows = [r for f in sorted(run_dir.glob("csv/version_*/metrics.csv")) for r in csv.DictReader(f.open())]
    losses = [float(r["train/loss_step"]) for r in rows if r.get("train/loss_step")]
    return losses[-1] if losses else math.nan


def check_fsdp(run_dir: Path) -> list[str]:
    """What test_fsdp_sim_trains_validates_checkpoints_and_reloads checks, at bf16 tolerance."""
    from experiments.probes import probe_batch
    from msl_rec.training.module import RecLitModule

    problems = []
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    lora = [k for k in state if "lora_" in k]
    if len(lora) != 30 * 2 * 2:  # 30 layers x (q_proj, v_proj) x (A, B)
        problems.append(f"{len(lora)} LoRA keys in {ckpt.name}, want 120")
    if any("_fsdp" in k for k in state) or any(not k.startswith("loss.") for k in set(state) - set(lora)):
        problems.append(f"unexpected keys in {ckpt.name}: {sorted(set(state) - set(lora))[:4]}")
    probe = torch.load(run_dir / "probe.pt", weights_only=True)
    ids, am = (t.cuda() for t in probe_batch())
    module = RecLitModule.load_from_checkpoint(ckpt, map_location="cpu").cuda().eval()
    with torch.no_grad():
        got = module(ids, am).float().cpu()
    scale = probe["trained"].abs().max().item()
    err = (got - probe["trained"]).abs().max().item() / scale
    if not err < 2e-2:  # FSDP's bf16 forward vs an fp32 reload
        problems.append(f"reloaded logits differ from the trained model's by {err:.2e} (relative)")
    if "decoding_copy" not in probe:
        problems.append("no FSDP decoding copy was built")
    else:
        err = (probe["decoding_copy"] - probe["trained"]).abs().max().item() / scale
        if not err < 2e-2:
            problems.append(f"decoding copy logits differ from the trained model's by {err:.2e} (relative)")
    return problems


def eval_speed(run_dir: Path) -> tuple[float, int, int]:
    """(users/s, users, peak bytes) of cbs_masked on ``run_dir``'s last checkpoint, as msl-rec-eval runs it."""
    from omegaconf import OmegaConf

    from msl_rec.data.build import build_data
    from msl_rec.decoding import build_decoder
    from msl_rec.evaluation import evaluate
    from msl_rec.training.module import RecLitModule
    from msl_rec.utils import config as _config  # noqa: F401  (registers ${project_root:})

    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    cfg.data.valid_subset = EVAL_USERS
    _, catalog, dm = build_data(cfg)
    dm.setup("fit")
    dm.setup("validate")
    decoder = build_decoder(OmegaConf.to_container(cfg.decoder, resolve=True), catalog,
                            train_targets=dm.train_targets or None)
    module = RecLitModule.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt", map_location="cpu")
    model = module.model.cuda().eval()
    batches = [{k: v.cuda() if torch.is_tensor(v) else v for k, v in b.items()} for b in dm.eval_dataloader("valid")]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = evaluate(decoder, model, batches, catalog)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    n = len(result.predictions)
    return n / seconds, n, torch.cuda.max_memory_allocated()


def main(argv: list[str]) -> int:
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device (torch.cuda.is_available() is False); run it on a machine with a GPU",
              file=sys.stderr)
        return 2
    t_start = time.time()
    root = Path("outputs/gpu_check") / time.strftime("%Y%m%d-%H%M%S")
    rows, failed = [], False
    dirs: dict[str, Path] = {}
    for name, overrides in TRAIN_RUNS:
        run_dir = (root / name.replace(" ", "_")).resolve()
        dirs[name] = run_dir
        extra = [f"sdpo.sft_ckpt={dirs['lml'] / 'checkpoints' / 'last.ckpt'}"] if name == "sdpo" else []
        cmd = [sys.executable, "-m", "msl_rec.train", *train_overrides(run_dir), *overrides, *extra, *argv]
        print("$", " ".join(cmd), flush=True)
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wall = time.time() - t0
        problems = [] if proc.returncode == 0 else [f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}"]
        loss = ndcg = peak = math.nan
        if not problems:
            loss = last_train_loss(run_dir)
            ndcg = json.loads((run_dir / "metrics.json").read_text()).get("ndcg@10", math.nan)
            peak = torch.load(run_dir / "probe.pt", weights_only=True)["peak_gpu_bytes"].item() / 2**20
            if not math.isfinite(loss):
                problems.append(f"train loss {loss}")
            if name.startswith("fsdp"):
                problems += check_fsdp(run_dir)
        failed |= bool(problems)
        rows.append((name, f"{loss:.4f}", f"{ndcg:.4f}", f"{wall:.0f}", f"{peak:.0f}",
                     "ok" if not problems else "FAIL: " + "; ".join(problems)))
    if (dirs["msl_ats"] / "checkpoints" / "last.ckpt").is_file():
        ups, n, peak = eval_speed(dirs["msl_ats"])
        rows.append((f"eval cbs_masked ({n} users)", "", "", f"{n / ups:.1f}", f"{peak / 2**20:.0f}",
                     f"{ups:.2f} users/s"))
    header = ("run", "train loss", "val ndcg@10", "wall s", "peak MiB", "checks")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(f"\ngpu-check on {torch.cuda.get_device_name(0)}, torch {torch.__version__}, {STEPS} steps of "
          f"{MICRO_BATCH} rows per run, bf16-mixed; folders under {root}")
    for r in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    print(f"total wall time {time.time() - t_start:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
