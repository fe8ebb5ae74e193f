"""The config schema: Hydra structured configs, one dataclass per group.

Typed fields make Hydra reject `train.lr=abc` or an unknown key with a clear message before
anything loads. The YAML files in conf/ pick values; these classes define what may be set.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class RunConfig:
    name: str = "demo"
    root: str = "runs"
    resume: bool = True  # continue an interrupted stage from its latest checkpoint when the config matches


@dataclass
class TrainConfig:
    max_steps: int = -1  # > 0 overrides epochs
    epochs: float = 1.0
    lr: float | None = None  # None: the recommended rate for the stage and weights (see align/stages/common.py)
    batch_size: int = 8  # per device
    grad_accum: int = 1
    max_length: int = 1024
    seed: int = 42
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    logging_steps: int = 10
    eval_steps: int = 0  # 0: evaluate once at the end
    save_steps: int = 500
    keep_checkpoints: int = 2
    max_bad_steps: int = 10  # non-finite loss/gradient steps in a row (each skipped) before the run stops


@dataclass
class ModelConfig:
    name_or_path: str = "builtin:tiny"
    revision: str | None = None
    trust_remote_code: bool = False
    dtype: str = "auto"  # auto: bf16 where supported, fp32 on CPU; or bf16 / fp16 / fp32
    attn_implementation: str | None = None  # sdpa, eager, flash_attention_2; None: transformers' choice
    gradient_checkpointing: bool = False


@dataclass
class DataConfig:
    train: str = "demo"  # file, save_to_disk folder, hub name, or `demo` for the bundled data
    eval: str | None = None  # same forms; None: data.eval_fraction, or the demo's eval split
    eval_fraction: float = 0.0
    format: str = "auto"
    split: str = "train"
    eval_split: str = "test"
    dedup: bool = False
    on_error: str = "raise"  # raise | skip
    max_rows: int = 0  # 0: all
    checker: str | None = "auto"  # auto (demo for the bundled data, else none) | demo | exact | regex | json
    checker_pattern: str | None = None  # for checker=regex


@dataclass
class QuantConfig:
    bits: int = 4
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "auto"  # auto follows model.dtype


@dataclass
class PeftConfig:
    method: str = "none"  # none | lora | qlora
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: Any = "all-linear"
    quant: QuantConfig = field(default_factory=QuantConfig)


@dataclass
class DeepSpeedConfig:
    zero_stage: int = -1  # -1: no DeepSpeed; 0..3: the ZeRO stage
    offload_optimizer: str = "none"  # none | cpu (ZeRO 1-3: optimizer states and step on the CPU)
    offload_param: str = "none"  # none | cpu (ZeRO-3 only: parameters live on the CPU)
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    bucket_size: Any = "auto"  # reduce/prefetch bucket size: "auto" (from the hidden size) or a number
    extra: dict[str, Any] = field(default_factory=dict)  # merged last into the generated DeepSpeed JSON


@dataclass
class LoggerConfig:
    backend: str = "none"  # none | wandb
    project: str = "align"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    name: str | None = None  # default: <run.name>-<stage>
    mode: str | None = None  # online | offline | disabled; None: offline when WANDB_MODE says so or no key


@dataclass
class StageConfig:
    name: str = MISSING
    init: str | None = None  # a model/stage directory instead of the run's parent stage; `base`: model.name_or_path


@dataclass
class SFTStageConfig(StageConfig):
    name: str = "sft"
    packing: bool = False


@dataclass
class RMStageConfig(StageConfig):
    name: str = "rm"
    center_rewards_coef: float | None = None  # adds coef * mean((r_chosen + r_rejected)^2): rewards centred on 0


DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")


@dataclass
class DPOStageConfig(StageConfig):
    name: str = "dpo"
    beta: float = 0.1  # strength of the pull toward the reference (higher: stay closer)
    loss_type: Any = "sigmoid"  # one of DPO_LOSS_TYPES, or a list combined with loss_weights, e.g. [sigmoid,sft]
    loss_weights: list[float] | None = None
    label_smoothing: float = 0.0  # robust / exo_pair / aot: assumed share of flipped labels
    precompute_ref_logps: bool = False  # score the data with the reference once, then drop it from memory


@dataclass
class PPOStageConfig(StageConfig):
    name: str = "ppo"
    actor: str | None = None  # actor and reference; default: the run's sft (stage.init is the same)
    reward: str | None = None  # reward model; default: the run's rm
    critic: str | None = None  # critic init (a sequence classifier); default: the reward model
    critic_peft: str = "auto"  # auto (LoRA when peft is lora/qlora) | none | lora
    critic_lr: float | None = None  # None: train.lr
    # auto: reference and reward model beside the actor (sharded under ZeRO-3); cpu: their weights stay in CPU
    # memory (ZeRO-3: parameter offload; otherwise they run on the CPU). With LoRA the reference is the actor's base.
    frozen_device: str = "auto"
    # rollout
    rollout_batch_size: int = 64  # prompts per rank per PPO step
    max_prompt_length: int = 512
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    stop_tokens: list[str] = field(default_factory=list)  # extra single-token stops besides EOS
    missing_eos_penalty: float | None = None  # subtracted from the score of a response with no EOS
    # score
    reward_norm: bool = True  # (score - mean) / std with the reward model's stored statistics
    reward_clip: float | None = 10.0
    # KL penalty
    kl_coef: float = 0.05
    kl_estimator: str = "k1"  # k1 | k3
    kl_target: float | None = None  # set: adaptive coefficient tracking this KL per sequence
    kl_horizon: int = 10000
    # advantages and losses
    gamma: float = 1.0
    lam: float = 0.95
    whiten_rewards: bool = False
    whiten_advantages: bool = True
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.1
    ppo_epochs: int = 4
    eval_prompts: int = 256  # held-out prompts scored (greedy) before and after training; 0: none


@dataclass
class EvalStageConfig(StageConfig):
    name: str = "eval"
    policies: list[str] = field(default_factory=list)  # run stages (sft, dpo, ppo) or model paths; []: those the run has
    baseline: str | None = "sft"  # win-rate and KL are measured against it: the run's sft, or a path; null: none
    reward: str | None = None  # judge for reward / win-rate / pair accuracy: the run's rm, or a path; `none`: no judge
    pairs: str | None = None  # preference pairs for the judge's accuracy; default: the judge's own held-out pairs
    prompts: int = 256  # held-out prompts each policy answers (greedy; 0: all)
    max_prompt_length: int = 512
    max_new_tokens: int = 64
    kl_samples: int = 1  # sampled responses per prompt for the KL estimate
    batch_size: int = 64  # prompts per forward/generate call


@dataclass
class PipelineConfig:
    """What `recipe=NAME` sets: the stages to run in order. Empty: run the single `stage`."""

    name: str | None = None  # the recipe's name
    stages: list[str] = field(default_factory=list)
    force: list[str] = field(default_factory=list)  # re-run these stages (and so everything downstream); [all]: every one
    objective: str | None = None  # `<stage>.<metric>` from stage.json, returned to a sweeper (Optuna)
    summary: bool = True  # summary.md, plots and the table at the end


STAGE_SCHEMAS = {"sft": SFTStageConfig, "rm": RMStageConfig, "dpo": DPOStageConfig, "ppo": PPOStageConfig,
                 "eval": EvalStageConfig}
# groups a recipe may set per stage: `sft.train.epochs=2`, `rm.data.train=prefs.jsonl`
SECTION_GROUPS = {"train": TrainConfig, "data": DataConfig, "model": ModelConfig, "peft": PeftConfig}


def _overlay(schema: type, name: str, extra: dict[str, type] | None = None) -> type:
    """A dataclass with the same fields as `schema`, each optional and unset (`???`) by default.

    An unset field leaves the base value alone; a set one (null included) replaces it. Typed, so a
    typo (`dpo.betta=0.1`) or a wrong type is rejected before anything loads.
    """
    hints = typing.get_type_hints(schema)
    fields = []
    for f in dataclasses.fields(schema):
        if f.name == "name" and issubclass(schema, StageConfig):
            continue
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            sub = _overlay(kind, f"{name}{kind.__name__}")
            fields.append((f.name, sub, field(default_factory=sub)))
        else:
            fields.append((f.name, Any if kind is Any else Optional[kind], field(default=MISSING)))
    for key, sub in (extra or {}).items():
        fields.append((key, sub, field(default_factory=sub)))
    return dataclasses.make_dataclass(name, fields)


def _section(stage: str) -> type:
    groups = {g: _overlay(schema, f"{stage.upper()}{schema.__name__}Overlay") for g, schema in SECTION_GROUPS.items()}
    return _overlay(STAGE_SCHEMAS[stage], f"{stage.upper()}Section", groups)


SECTIONS = {name: _section(name) for name in STAGE_SCHEMAS}


@dataclass
class AlignConfig:
    stage: Any = MISSING
    run: RunConfig = field(default_factory=RunConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    # per-stage overrides inside a recipe (see recipes/): unset keys leave the shared value alone
    sft: SECTIONS["sft"] = field(default_factory=SECTIONS["sft"])  # type: ignore[valid-type]
    rm: SECTIONS["rm"] = field(default_factory=SECTIONS["rm"])  # type: ignore[valid-type]
    dpo: SECTIONS["dpo"] = field(default_factory=SECTIONS["dpo"])  # type: ignore[valid-type]
    ppo: SECTIONS["ppo"] = field(default_factory=SECTIONS["ppo"])  # type: ignore[valid-type]
    eval: SECTIONS["eval"] = field(default_factory=SECTIONS["eval"])  # type: ignore[valid-type]


def register() -> None:
    from align import recipes

    cs = ConfigStore.instance()
    cs.store(name="align_schema", node=AlignConfig)
    for name, schema in STAGE_SCHEMAS.items():
        cs.store(group="stage", name=f"{name}_schema", node=schema)
    recipes.register(cs)


def config_dir() -> Path:
    """conf/ in a source checkout or editable install; align/conf in a wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "conf", here / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"align's conf/ directory was not found next to {here}")
