"""The config schema: Hydra structured configs, one dataclass per group.

Typed fields make Hydra reject `train.lr=abc` or an unknown key with a clear message before
anything loads. The YAML files in conf/ pick values; these classes define what may be set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    zero_stage: int = -1  # -1: no DeepSpeed


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
    init: str | None = None  # start from this model directory instead of the run's parent stage


@dataclass
class SFTStageConfig(StageConfig):
    name: str = "sft"
    packing: bool = False


@dataclass
class RMStageConfig(StageConfig):
    name: str = "rm"
    center_rewards_coef: float | None = None  # adds coef * mean((r_chosen + r_rejected)^2): rewards centred on 0


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


STAGE_SCHEMAS = {"sft": SFTStageConfig, "rm": RMStageConfig}


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="align_schema", node=AlignConfig)
    for name, schema in STAGE_SCHEMAS.items():
        cs.store(group="stage", name=f"{name}_schema", node=schema)


def config_dir() -> Path:
    """conf/ in a source checkout or editable install; align/conf in a wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "conf", here / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"align's conf/ directory was not found next to {here}")
