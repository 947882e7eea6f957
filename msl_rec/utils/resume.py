"""Resuming a run in its own folder: ``msl-rec-train resume=<run dir> [trainer.max_epochs=...]``.

:func:`resume_argv` runs before Hydra composes anything: it points ``hydra.run.dir`` at the old run
(so logs, checkpoints and the wandb id stay in one folder) and stores this invocation's Hydra files
under ``.hydra/resume-<time>`` so the run's original ``.hydra/config.yaml`` is kept. :func:`resume_config`
then replaces the composed config with the saved one plus this command's value overrides, and
sets ``ckpt_path`` to ``checkpoints/last.ckpt`` (unless the command names another ``ckpt_path``).

A resumed run must go on training the same thing, so this command may change only the keys in
:data:`SAFE_RESUME_KEYS` (how long to train, loaders, logging, checkpoint frequency). Any other
changed value (``optim.lr``, ``dataset.train_file``, ``seed`` ...) is an error that lists every
changed key as ``old -> new``; start a new run for those. A config group override (``loss=lml``,
``budget=cpu``; every group of the composed config, ``hydra.runtime.choices``) is an error unless it
names the group option the run already used. The accepted changes are appended to
``<run>/.hydra/resume_changes.jsonl`` (one JSON line per resume: time, overrides, ``{key: {old, new}}``).
Each resume starts from the saved config again: changes of an earlier resume are not carried over.
The saved config is read onto the training schema (msl_rec/utils/schema.py ``TrainConfig``), so a
resumed run is typed as a new one; a saved key the schema no longer has is an error naming it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from msl_rec.utils.schema import TrainConfig

WANDB_ID_FILE = "wandb_id.txt"
CHANGES_FILE = "resume_changes.jsonl"
# Keys a resume may change: they do not change what is trained, only for how long, how it is loaded,
# logged and checkpointed. "x.*" covers every key under x. The one list to edit (and document in the
# README's "Failure behaviour") when another key proves safe.
SAFE_RESUME_KEYS = (
    "trainer.max_epochs",
    "trainer.max_steps",
    "data.num_workers",
    "data.eval_batch_size",
    "callbacks.step_checkpoint.every_n_train_steps",
    "ckpt_path",       # which checkpoint of the run to continue from (default: checkpoints/last.ckpt)
    "decoder.dtype",   # validation decoding only (a run saved with the retired dtype=auto resumes with float32)
    "tags",
    "logger.*",
    "extras.*",
)
_ABSENT = "<absent>"


def _resume_dir(argv: list[str]) -> str | None:
    for arg in argv:
        if arg.startswith("resume=") and arg.split("=", 1)[1] not in ("", "null"):
            return arg.split("=", 1)[1]
    return None


def resume_argv(argv: list[str]) -> list[str]:
    """Add the Hydra overrides a resume needs (no-op without ``resume=``).

    They go first, so a later ``hydra.run.dir`` / ``hydra.output_subdir`` wins: Lightning's DDP
    launcher restarts this command for ranks > 0 with its own (``hydra.output_subdir=null``) appended.
    """
    run = _resume_dir(argv)
    if run is None:
        return argv
    run_dir = Path(run).expanduser().resolve()
    if not (run_dir / ".hydra" / "config.yaml").is_file():
        raise FileNotFoundError(f"resume={run}: no .hydra/config.yaml there (not a msl-rec run folder)")
    for arg in argv:  # Lightning's DDP launcher passes the run's own folder (quoted) to ranks > 0
        if arg.startswith("hydra.run.dir=") and Path(arg.split("=", 1)[1].strip("'\"")).resolve() != run_dir:
            raise ValueError(f"resume={run} continues the run in its own folder: drop {arg}")
    argv = [a if not a.startswith("resume=") else f"resume={run_dir}" for a in argv]
    return [f"hydra.run.dir={run_dir}", f"hydra.output_subdir=.hydra/resume-{time.strftime('%Y%m%d-%H%M%S')}",
            *argv]


def is_safe_resume_key(key: str) -> bool:
    """Whether a resume may change ``key`` (:data:`SAFE_RESUME_KEYS`)."""
    return any(key == s or (s.endswith(".*") and key.startswith(s[:-1])) for s in SAFE_RESUME_KEYS)


def _value(cfg: DictConfig, key: str) -> Any:
    """``cfg``'s value at dotted ``key`` as plain data, resolved where it can be, or :data:`_ABSENT`."""
    try:
        node = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False)
        resolve = True
    except OmegaConfBaseException:  # an interpolation that cannot be resolved here: compare its text
        node, resolve = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False,
                                         throw_on_resolution_failure=False), False
    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=resolve)
    return node


def load_saved_config(path: Path) -> DictConfig:
    """A run's saved ``.hydra/config.yaml`` merged onto :class:`~msl_rec.utils.schema.TrainConfig`: typed,
    with the defaults of keys added since it was saved; a key the schema does not have is an error."""
    try:
        return OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(path))
    except OmegaConfBaseException as e:
        raise ValueError(f"resume: {path} does not fit the training config's schema (msl_rec/utils/schema.py): "
                         f"{e}; it was saved by another msl-rec version: start a new run") from None


def _saved_choices(run_dir: Path) -> dict[str, Any]:
    """The group options the run was composed with (its ``.hydra/hydra.yaml``; ``{}`` if absent)."""
    path = run_dir / ".hydra" / "hydra.yaml"
    if not path.is_file():
        return {}
    saved = OmegaConf.load(path)
    return dict(OmegaConf.select(saved, "hydra.runtime.choices", default={}) or {})


def resume_config(cfg: DictConfig, overrides: list[str], groups: dict[str, Any] | None = None,
                  record: bool = True) -> DictConfig:
    """The saved config of ``cfg.resume`` with this command's value overrides applied.

    ``cfg``: the config Hydra composed for this command (its values at the overridden keys are the
    new values, typed as Hydra parsed them); ``overrides``: this command's task overrides;
    ``groups``: the config groups and the options chosen (``HydraConfig.get().runtime.choices``).
    Raises ``ValueError`` for a group override and for a change of a key outside
    :data:`SAFE_RESUME_KEYS`; with ``record``, appends the accepted changes to
    ``.hydra/resume_changes.jsonl``.
    """
    run_dir = Path(cfg.resume)
    saved = load_saved_config(run_dir / ".hydra" / "config.yaml")
    groups = dict(groups or {})
    old_choices = _saved_choices(run_dir)
    changes: dict[str, dict[str, Any]] = {}
    explicit_ckpt = None
    for ov in OverridesParser.create().parse_overrides(overrides):
        key = ov.key_or_group
        if key == "resume" or key == "hydra" or key.startswith(("hydra.", "hydra/")):
            continue  # where this invocation's Hydra files go; not part of the run's config
        if key in groups:
            new = None if ov.is_delete() else ov.value()
            if key in old_choices and str(old_choices[key]) == str(new):
                continue  # the option the run already used
            raise ValueError(f"resume: the config group override {ov.input_line!r} cannot change a resumed run "
                             f"(it used {key}={old_choices.get(key, '?')}); start a new run for another {key}")
        old = _value(saved, key)
        new = _ABSENT if ov.is_delete() else _value(cfg, key)
        if key == "ckpt_path":
            explicit_ckpt = None if new is _ABSENT else new
        if old != new:
            changes[key] = {"old": old, "new": new}
    unsafe = {k: v for k, v in changes.items() if not is_safe_resume_key(k)}
    if unsafe:
        diff = "\n".join(f"  {k}: {v['old']!r} -> {v['new']!r}" for k, v in unsafe.items())
        raise ValueError(
            f"resume={run_dir}: this command changes keys that would make the run train something else than "
            f"it started with:\n{diff}\nOnly {', '.join(SAFE_RESUME_KEYS)} may change on a resume "
            "(msl_rec/utils/resume.py SAFE_RESUME_KEYS); start a new run for the others")
    cfg_out = saved
    with open_dict(cfg_out):
        for key, change in changes.items():
            if change["new"] is _ABSENT:
                parent, _, leaf = key.rpartition(".")
                node = OmegaConf.select(cfg_out, parent) if parent else cfg_out
                if node is not None and leaf in node:
                    del node[leaf]
            else:
                OmegaConf.update(cfg_out, key, change["new"], force_add=True, merge=False)
        cfg_out.resume = str(run_dir)
        # the ckpt_path saved with the run is where it once started from, not where it stopped
        cfg_out.ckpt_path = explicit_ckpt
        if not explicit_ckpt:
            last = run_dir / "checkpoints" / "last.ckpt"
            if not last.is_file():
                raise FileNotFoundError(f"resume={run_dir}: {last} not found (the run saved no checkpoint yet: "
                                        "start it again in a new folder)")
            cfg_out.ckpt_path = str(last)
    if record and changes:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "overrides": list(overrides), "changes": changes}
        with open(run_dir / ".hydra" / CHANGES_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry, default=str) + "\n")
    return cfg_out
