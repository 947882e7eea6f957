"""Building callbacks and loggers from config, naming wandb runs, and recording the config (rank 0 only).

A wandb run is named after what varies (:func:`run_identity`): ``<dataset>/<backbone>/<loss>`` then
the command line's value overrides that change what is trained (the seed, ``data.*`` and ``trainer.*``
last; cut with a hash to fit wandb's limit), e.g. ``books/smollm2_135m/msl_ats/tau=1.5/seed=2``; its group is the same without the seed (a sweep's jobs:
the sweep folder's name) and its tags name the dataset, backbone, loss, decoder and preset. What the
run folder's wandb run is called is kept in ``<run>/wandb_run.json`` (a resumed run keeps its name;
``msl-rec-eval run_dir=`` joins its group). ``logger.wandb.name/group/tags`` set by the user win.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from pathlib import Path
from typing import Any

import hydra
import yaml
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from msl_rec.utils.registry import LOSSES
from msl_rec.utils.resume import WANDB_ID_FILE
from msl_rec.utils.task import is_multirun

log = logging.getLogger(__name__)

RUN_FILE = "wandb_run.json"
"""``{id, name, group, tags, project, entity}`` of the wandb run a run folder logs to."""

# command-line keys that change how a run is launched or logged, not what it trains: left out of names
NAME_IGNORED_KEYS = ("hydra", "logger", "callbacks", "extras", "paths", "tags", "task_name", "resume", "run_dir",
                     "ckpt_path", "trainer.devices", "trainer.num_nodes", "trainer.accelerator", "trainer.strategy",
                     "data.num_workers", "data.eval_batch_size")
SIZE_KEYS = ("data.", "trainer.")  # how much data and training: last in names
MAX_NAME_LEN = 128  # wandb refuses longer run names and groups
EVAL_SUFFIX_ROOM = 16  # training names leave room for an eval run's "/eval-<split>" (msl_rec/utils/dashboard.py)
MAX_TAG_LEN = 64   # and longer tags


def instantiate_callbacks(cfg: DictConfig | None) -> list:
    return [hydra.utils.instantiate(c) for c in (cfg or {}).values() if isinstance(c, DictConfig) and "_target_" in c]


def _hydra_overrides_and_choices() -> tuple[list[str], dict[str, Any]]:
    """This job's task overrides and config-group choices (both empty outside a Hydra app)."""

    if not HydraConfig.initialized():
        return [], {}
    hc = HydraConfig.get()
    return [str(o) for o in hc.overrides.task], dict(OmegaConf.select(hc, "runtime.choices", default={}) or {})


def _name_value(value: str) -> str:
    """An override's value as a name part: a path's file name, other ``/`` as ``:`` (``/`` splits names)."""
    if value.startswith(("/", "./", "../", "~")):
        return value.rstrip("/").rsplit("/", 1)[-1]
    return value.replace("/", ":")


def override_parts(overrides: list[str], groups: dict[str, Any]) -> list[str]:
    """``key=value`` name parts for the value overrides in ``overrides`` (not group choices, not
    :data:`NAME_IGNORED_KEYS`), in command-line order but ``seed`` and then :data:`SIZE_KEYS` last; a key
    is shortened to its last component (``loss.tau`` -> ``tau``) unless two overrides would then share it."""
    kept: dict[str, str] = {}
    for ov in overrides:
        if ov.startswith("~") or "=" not in ov:
            continue
        key, value = ov.lstrip("+").split("=", 1)
        if key in groups or "/" in key or any(key == k or key.startswith(k + ".") for k in NAME_IGNORED_KEYS):
            continue
        kept.pop(key, None)  # a repeated key: the last value counts, at its last place
        kept[key] = _name_value(value)
    # the seed, then how much data and training (often fixed across a sweep) go last: a name too long
    # for wandb loses those first (see _join)
    for key in [k for k in kept if k == "seed"] + [k for k in kept if k.startswith(SIZE_KEYS)]:
        kept[key] = kept.pop(key)
    shorts = [k.rsplit(".", 1)[-1] for k in kept]
    return [f"{k.rsplit('.', 1)[-1] if shorts.count(k.rsplit('.', 1)[-1]) == 1 else k}={v}" for k, v in kept.items()]


def _join(parts: list[str], varying: list[str], limit: int = MAX_NAME_LEN - EVAL_SUFFIX_ROOM) -> str:
    """``parts/varying...``; past ``limit`` characters the parts that do not fit are replaced by
    ``~<hash of all varying parts>``, so the name stays unique and stable."""
    name = "/".join(parts + varying)
    if len(name) <= limit:
        return name
    tail = "~" + hashlib.sha1("/".join(varying).encode()).hexdigest()[:8]
    kept = list(parts)
    for part in varying:
        if len("/".join(kept + [part, tail])) > limit:
            break
        kept.append(part)
    return "/".join(kept + [tail])[-limit:]


def _unique(items: list[Any]) -> list[str]:
    return list(dict.fromkeys(str(i) for i in items if i not in (None, "")))


def run_identity(cfg: DictConfig, job_type: str = "train") -> dict[str, Any]:
    """The wandb ``name``, ``group``, ``tags`` and ``job_type`` of a training run of ``cfg``.

    name: ``<dataset>/<backbone>/<loss>[/<method>]`` (a sequential method: ``<dataset>/<method>/<loss>``; the
    default ``bigrec`` unnamed) + :func:`override_parts` (``seed=2`` included);
    group: the same without ``seed=``; tags: dataset, backbone, loss, decoder, method, the chosen
    ``experiment`` preset and ``cfg.tags``.
    """

    overrides, groups = _hydra_overrides_and_choices()
    loss = LOSSES.get(OmegaConf.select(cfg, "loss._target_"), OmegaConf.select(cfg, "loss.name"))
    method = cfg.get("method")
    kind = method.get("kind", "llm") if isinstance(method, DictConfig) else "llm"
    method = method.get("name") if isinstance(method, DictConfig) else method
    if kind == "sequential":  # no backbone: <dataset>/<method>/<loss>
        parts = _unique([OmegaConf.select(cfg, "dataset.name"), method, loss])
    else:  # the default LLM method (bigrec) is not named
        parts = _unique([OmegaConf.select(cfg, "dataset.name"), OmegaConf.select(cfg, "backbone.name"), loss,
                         None if method == "bigrec" else method])
    varying = override_parts(overrides, groups)
    tags = _unique([*parts, OmegaConf.select(cfg, "decoder.name"), groups.get("experiment"), *(cfg.get("tags") or [])])
    tags = [t[:MAX_TAG_LEN] for t in tags]
    return {"name": _join(parts, varying), "group": _join(parts, [p for p in varying if not p.startswith("seed=")]),
            "tags": tags, "job_type": job_type}


def read_run_file(run_dir: str | Path) -> dict[str, Any] | None:
    """The wandb identity a run folder recorded (:data:`RUN_FILE`), None if it has none."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg}); remove it (the run gets a new wandb name)") from None


def _prepare_wandb(node: DictConfig, run_dir: Path, identity: dict[str, Any] | None = None) -> None:
    """Fill the WandbLogger settings: the run folder's wandb id (resume) or a new one; name, group,
    tags and job type from, in this order: the user's ``logger.wandb.*``, the folder's :data:`RUN_FILE`
    (a resumed run keeps its name), the sweep (a multirun's group is its folder name), ``identity``."""
    id_file = run_dir / WANDB_ID_FILE
    saved = read_run_file(run_dir) if id_file.is_file() else None
    with open_dict(node):
        if not node.get("id"):
            node.id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
        node.resume = "allow"
        if not node.get("group") and not saved and is_multirun():
            node.group = Path(HydraConfig.get().sweep.dir).name
        for key in ("name", "group", "tags", "job_type"):
            if not node.get(key):
                node[key] = (saved or {}).get(key) or (identity or {}).get(key) or node.get(key)
    if rank_zero_only.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        id_file.write_text(str(node.id))
        plain = OmegaConf.to_container(node, resolve=True)
        record = {k: plain.get(k) for k in ("id", "name", "group", "tags", "project", "entity")}
        (run_dir / RUN_FILE).write_text(json.dumps(record, indent=1) + "\n")


def instantiate_loggers(cfg: DictConfig | None, run_dir: str | Path, identity: dict[str, Any] | None = None) -> list:
    """The loggers of ``cfg`` (``cfg.logger``); a wandb logger gets the run folder's id and
    ``identity`` (:func:`run_identity`) as its name, group, tags and job type (see :func:`_prepare_wandb`)."""
    loggers = []
    for node in (cfg or {}).values():
        if not isinstance(node, DictConfig) or "_target_" not in node:
            continue
        if "wandb" in node._target_.lower():
            _prepare_wandb(node, Path(run_dir), identity)
        loggers.append(hydra.utils.instantiate(node))
    return loggers


def log_config(loggers: list, config: dict[str, Any]) -> None:
    """Send ``config`` (plain data) to every logger; an offline wandb run also gets it as
    ``files/config.yaml`` (wandb writes that file only when it syncs)."""

    for lg in loggers:
        lg.log_hyperparams(config)
        if isinstance(lg, WandbLogger) and getattr(lg.experiment, "offline", False):
            (Path(lg.experiment.dir) / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


@rank_zero_only
def log_hyperparameters(cfg: DictConfig, trainer, module) -> None:
    """Send the composed, resolved config (no ``hydra`` node) and parameter counts to every logger."""
    if not trainer.loggers:
        return
    hp = OmegaConf.to_container(cfg, resolve=True)
    hp.pop("hydra", None)
    model = getattr(module, "model", None)
    if model is not None:
        hp["model/params_total"] = sum(p.numel() for p in model.parameters())
        hp["model/params_trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log_config(trainer.loggers, hp)
