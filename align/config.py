"""The config schema: Hydra structured configs, one dataclass per group.

Typed fields make Hydra reject `train.lr=abc` or an unknown key with a clear message before
anything loads. The YAML files in conf/ pick values; these classes define what may be set.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass(frozen=True)
class Check:
    """The allowed values of one key, declared beside it (`keyed`) and applied before anything loads
    (align/validate.py): a numeric range, a set of names, or both (e.g. -1 or >= 1). None passes
    wherever the key's type allows it."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself not allowed
    high_open: bool = False
    choices: tuple = ()  # allowed values (names, or special numbers beside the range)

    def allows(self, value) -> bool:
        if value is None or value in self.choices:
            return True
        if self.low is None and self.high is None:
            return not self.choices  # names only, and the value is not one of them
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return True  # a range on a non-number: the schema's type check has the say
        below = self.low is not None and (value < self.low or (self.low_open and value == self.low))
        above = self.high is not None and (value > self.high or (self.high_open and value == self.high))
        return not (below or above)

    def describe(self) -> str:
        parts = []
        if self.low is not None and self.high is not None:
            parts.append(f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}")
        elif self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        elif self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        if self.choices:
            names = ", ".join(str(c) for c in self.choices)
            parts.insert(0, f"one of {names}") if not parts else parts.append(f"or {names}")
        return " ".join(parts)


POSITIVE, NON_NEGATIVE, AT_LEAST_ONE = Check(low=0, low_open=True), Check(low=0), Check(low=1)
PROBABILITY, FRACTION = Check(0, 1), Check(0, 1, high_open=True)


def one_of(*names) -> Check:
    return Check(choices=tuple(names))


def keyed(default, check: Check | None = None, help: str = "", factory=None):
    """A schema field with its allowed values and a one-line help (docs and --help read both)."""
    meta = {"check": check, "help": help}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay")
DATA_FORMATS = ("auto", "messages", "sharegpt", "alpaca", "prompt_completion", "query_response")


@dataclass
class RunConfig:
    name: str = keyed("demo", help="run folder under run.root; stages of one run find each other by it")
    root: str = keyed("runs", help="where runs are written")
    resume: bool = keyed(True, help="continue an interrupted stage from its latest checkpoint when the config matches")
    force: bool = keyed(False, help="re-train a stage that is already complete (an interrupted run's checkpoints are "
                                    "kept aside until the new run commits its first one)")


@dataclass
class TrainConfig:
    max_steps: int = keyed(-1, Check(low=1, choices=(-1,)), "optimizer steps; -1: train.epochs decides")
    epochs: float = keyed(1.0, POSITIVE, "passes over the data (when max_steps is -1)")
    lr: float | None = keyed(None, POSITIVE, "learning rate; null: the stage's recommended rate for tiny, full or "
                                             "adapter weights (its StageSpec.lr)")
    # defaults for real models: batch 4 x 4 and 2048 tokens fit a 7B with LoRA and activation checkpointing on
    # one 80 GB GPU (the demo data group sets its own for the tiny model)
    batch_size: int = keyed(4, AT_LEAST_ONE, "rows per device per micro-step")
    grad_accum: int = keyed(4, AT_LEAST_ONE, "micro-steps per optimizer step")
    max_length: int = keyed(2048, Check(low=8), "tokens per row; longer rows are cut")
    seed: int = keyed(42, help="seed of data order, new heads and adapters")
    lr_scheduler: str = keyed("cosine", one_of(*LR_SCHEDULERS), "learning-rate schedule")
    warmup_ratio: float = keyed(0.03, FRACTION, "share of the steps spent warming the learning rate up")
    weight_decay: float = keyed(0.0, NON_NEGATIVE, "AdamW weight decay")
    max_grad_norm: float = keyed(1.0, NON_NEGATIVE, "gradient clipping norm; 0: none")
    logging_steps: int = keyed(10, AT_LEAST_ONE, "steps between logged metrics")
    eval_steps: int = keyed(0, NON_NEGATIVE, "steps between evaluations; 0: once at the end")
    save_steps: int = keyed(500, AT_LEAST_ONE, "steps between checkpoints")
    keep_checkpoints: int = keyed(2, AT_LEAST_ONE, "committed checkpoints kept")
    max_bad_steps: int = keyed(10, AT_LEAST_ONE, "non-finite loss/gradient steps in a row (each skipped) before the run stops")


@dataclass
class ModelConfig:
    name_or_path: str = keyed("builtin:tiny", help="hub id, local model directory, or builtin:tiny")
    revision: str | None = keyed(None, help="hub revision (branch, tag or commit)")
    trust_remote_code: bool = keyed(False, help="allow the model's own code from the hub")
    dtype: str = keyed("auto", one_of("auto", "bf16", "fp16", "fp32"), "auto: bf16 where supported, fp32 on CPU")
    attn_implementation: str | None = keyed(
        None, one_of("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"),
        "attention kernel; null: transformers' choice")
    gradient_checkpointing: bool = keyed(False, help="recompute activations in the backward pass (less memory)")


@dataclass
class DataConfig:
    train: str = keyed("demo", help="file, save_to_disk folder, hub name, `demo` for the bundled demo, or "
                                    "`task:<name>` for a task of the zoo (data=task/<name>)")
    eval: str | None = keyed(None, help="same forms; null: data.eval_fraction, or the demo's eval split")
    eval_fraction: float = keyed(0.0, FRACTION, "share of data.train held out for evaluation when data.eval is null")
    format: str = keyed("auto", one_of(*DATA_FORMATS), "instruction format; auto: detected per row")
    split: str = keyed("train", help="split of a hub dataset or DatasetDict folder")
    eval_split: str = keyed("test", help="split read for data.eval")
    dedup: bool = keyed(False, help="drop exact duplicate rows")
    on_error: str = keyed("raise", one_of("raise", "skip"), "a bad row stops the run (raise) or is skipped and counted")
    max_rows: int = keyed(0, NON_NEGATIVE, "use the first N training rows; 0: all")
    checker: str | None = keyed("auto", one_of("auto", "demo", "exact", "regex", "json"),
                                "task checker; auto: demo on the bundled data, else none")
    checker_pattern: str | None = keyed(None, help="regular expression for checker=regex")


@dataclass
class QuantConfig:
    bits: int = keyed(4, one_of(4, 8), "4 (NF4/FP4) or 8")
    quant_type: str = keyed("nf4", one_of("nf4", "fp4"), "4-bit data type")
    double_quant: bool = keyed(True, help="quantize the quantization constants too")
    compute_dtype: str = keyed("auto", one_of("auto", "bf16", "fp16", "fp32"), "auto follows model.dtype")


@dataclass
class PeftConfig:
    method: str = keyed("none", one_of("none", "lora", "qlora"), "full weights, LoRA, or LoRA on a quantized base")
    r: int = keyed(16, AT_LEAST_ONE, "LoRA rank")
    alpha: int = keyed(32, POSITIVE, "LoRA scale numerator (scale = alpha / r)")
    dropout: float = keyed(0.05, FRACTION, "LoRA dropout")
    target_modules: Any = keyed("all-linear", help="modules that get adapters: all-linear or a list of names")
    quant: QuantConfig = keyed(None, factory=QuantConfig)


@dataclass
class DeepSpeedConfig:
    zero_stage: int = keyed(-1, one_of(-1, 0, 1, 2, 3), "-1: no DeepSpeed; 0..3: the ZeRO stage")
    offload_optimizer: str = keyed("none", one_of("none", "cpu"), "optimizer states and step on the CPU (ZeRO 1-3)")
    offload_param: str = keyed("none", one_of("none", "cpu"), "parameters live on the CPU (ZeRO-3 only)")
    overlap_comm: bool = keyed(True, help="overlap gradient reduction with the backward pass")
    contiguous_gradients: bool = keyed(True, help="copy gradients into one buffer as they are produced")
    bucket_size: Any = keyed("auto", help='reduce/prefetch bucket size: "auto" (from the hidden size) or a number')
    extra: dict[str, Any] = keyed(None, help="merged last into the generated DeepSpeed JSON", factory=dict)


@dataclass
class LoggerConfig:
    backend: str = keyed("none", one_of("none", "wandb"), "where metrics go besides the console and history.jsonl")
    project: str = keyed("align", help="W&B project")
    entity: str | None = keyed(None, help="W&B entity")
    group: str | None = keyed(None, help="W&B group (a sweep sets it)")
    tags: list[str] = keyed(None, help="W&B tags", factory=list)
    name: str | None = keyed(None, help="W&B run name; default <run.name>-<stage>")
    mode: str | None = keyed(None, one_of("online", "offline", "disabled"),
                             "null: offline when WANDB_MODE says so or no key is set")


@dataclass
class StageConfig:
    name: str = MISSING
    init: str | None = keyed(None, help="a model/stage directory instead of the run's parent stage; "
                                        "`base`: model.name_or_path")


@dataclass
class SFTStageConfig(StageConfig):
    name: str = "sft"
    packing: bool = keyed(False, help="pack whole examples into train.max_length rows")


@dataclass
class RMStageConfig(StageConfig):
    name: str = "rm"
    center_rewards_coef: float | None = keyed(None, NON_NEGATIVE, "adds coef * mean((r_chosen + r_rejected)^2)")


DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")


@dataclass
class DPOStageConfig(StageConfig):
    name: str = "dpo"
    beta: float = keyed(0.1, POSITIVE, "strength of the pull toward the reference (higher: stay closer)")
    loss_type: Any = keyed(None, one_of(*DPO_LOSS_TYPES),
                           "one of the DPO losses, or a list combined with loss_weights; the default adds an NLL term "
                           "on the chosen answer to the sigmoid loss (plain sigmoid pushes the chosen answers down too)",
                           factory=lambda: ["sigmoid", "sft"])
    loss_weights: list[float] | None = keyed(None, NON_NEGATIVE, "one weight per loss_type entry")
    label_smoothing: float = keyed(0.0, Check(0, 0.5, high_open=True),
                                   "robust / exo_pair / aot: assumed share of flipped labels")
    precompute_ref_logps: bool = keyed(False, help="score the data with the reference once, then drop it from memory")
    displacement_bound: float | None = keyed(
        2.0, POSITIVE, "warn when the chosen answers' log-prob falls this many nats below the reference's while the "
                       "margin grows (likelihood displacement); null: no check")


@dataclass
class OnlineStageConfig(StageConfig):
    """What the online stages (ppo, grpo) share: sampling, the frozen models' place, the held-out eval."""

    frozen_device: str = keyed("auto", one_of("auto", "cpu"),
                               "auto: reference and reward model beside the policy; cpu: their weights stay in CPU memory")
    max_prompt_length: int = keyed(512, AT_LEAST_ONE, "longest prompt in tokens")
    max_new_tokens: int = keyed(64, AT_LEAST_ONE, "longest response in tokens")
    temperature: float = keyed(1.0, POSITIVE, "sampling temperature of rollouts")
    top_p: float = keyed(1.0, Check(0, 1, low_open=True), "nucleus sampling of rollouts")
    stop_tokens: list[str] = keyed(None, help="extra single-token stops besides EOS", factory=list)
    missing_eos_penalty: float | None = keyed(None, NON_NEGATIVE, "subtracted from the score of a response with no EOS")
    eval_prompts: int = keyed(256, NON_NEGATIVE, "held-out prompts answered (greedy) before and after training; 0: none")
    watch_window: int = keyed(10, Check(low=2), "steps compared by the over-optimisation watch (learned reward "
                                                "vs the checker on the rollouts)")
    gather_for_rollout: str = keyed("auto", one_of("auto", "on", "off"),
                                    "ZeRO-3: gather the policy once per rollout instead of per token (auto: when its "
                                    "full weights take under a quarter of the free memory)")
    gather_for_step: str = keyed("auto", one_of("auto", "on", "off"),
                                 "ZeRO-3: gather a step's models once (rollout, scoring, update) instead of layer by "
                                 "layer in every forward and backward (auto: when their full weights take under a "
                                 "quarter of the free memory; otherwise gather_for_rollout still applies). Models "
                                 "offloaded to CPU memory stay sharded")


@dataclass
class PPOStageConfig(OnlineStageConfig):
    name: str = "ppo"
    actor: str | None = keyed(None, help="actor and reference; default: the run's sft (stage.init is the same)")
    reward: str | None = keyed(None, help="reward model; default: the run's rm")
    critic: str | None = keyed(None, help="critic init (a sequence classifier); default: the reward model")
    critic_peft: str = keyed("auto", one_of("auto", "none", "lora"), "auto: LoRA when peft is lora/qlora")
    critic_lr: float | None = keyed(None, POSITIVE, "critic learning rate (the critic has its own AdamW, so this, not a loss weight, sets how fast it learns); null: train.lr")
    critic_max_grad_norm: float | None = keyed(10.0, NON_NEGATIVE, "gradient clipping norm of the critic (its value-loss gradients run larger than the policy's); null: train.max_grad_norm; 0: none")
    rollout_batch_size: int = keyed(64, AT_LEAST_ONE, "prompts per rank per PPO step")
    # score
    reward_norm: bool = keyed(True, help="(score - mean) / std with the reward model's stored statistics")
    reward_clip: float | None = keyed(10.0, POSITIVE, "clip normalised scores to +-this; null: no clip")
    # KL penalty
    kl_coef: float = keyed(0.2, NON_NEGATIVE, "per-token KL penalty coefficient (initial one when kl_target is set); "
                                                "docs/quality.md: 0.05 let the policy game the reward model")
    kl_estimator: str = keyed("k1", one_of("k1", "k2", "k3"), "per-token KL estimator (in the reward: any)")
    kl_target: float | None = keyed(None, POSITIVE, "set: adaptive coefficient tracking this KL per sequence")
    kl_horizon: int = keyed(10000, AT_LEAST_ONE, "adaptive KL controller horizon")
    # advantages and losses
    gamma: float = keyed(1.0, PROBABILITY, "discount")
    lam: float = keyed(0.95, PROBABILITY, "GAE lambda")
    whiten_rewards: bool = keyed(False, help="whiten per-token rewards before GAE")
    whiten_advantages: bool = keyed(True, help="whiten advantages per batch")
    clip_range: float = keyed(0.2, POSITIVE, "policy ratio clip")
    clip_range_value: float = keyed(0.2, POSITIVE, "value clip")
    ppo_epochs: int = keyed(4, AT_LEAST_ONE, "passes over each rollout batch")


@dataclass
class GRPOStageConfig(OnlineStageConfig):
    """Critic-free online RL (GRPO, Dr. GRPO, RLOO, REINFORCE++, DAPO's pieces) on PPO's engine."""

    name: str = "grpo"
    group_size: int = keyed(8, Check(low=2), "responses sampled per prompt (one group)")
    rollout_batch_size: int = keyed(8, AT_LEAST_ONE, "prompts per rank per step (x group_size responses)")
    overlong_buffer: int = keyed(0, NON_NEGATIVE, "DAPO soft overlong penalty over the last N tokens before "
                                                  "max_new_tokens; 0: off")
    overlong_penalty: float = keyed(1.0, NON_NEGATIVE, "the overlong penalty at max_new_tokens")
    # advantages and loss
    advantage: str = keyed("grpo", one_of("grpo", "dr_grpo", "rloo", "reinforce_pp"),
                           "grpo: group mean/std; dr_grpo: no std, no length normalisation; rloo: leave-one-out; "
                           "reinforce_pp: group mean, per-token KL in the reward, batch-whitened")
    loss_agg: str = keyed("auto", one_of("auto", "token_mean", "seq_mean", "seq_sum"),
                          "auto: seq_sum (sum / max_new_tokens) for dr_grpo, token_mean otherwise")
    clip_low: float = keyed(0.2, POSITIVE, "ratio clip below 1")
    clip_high: float = keyed(0.28, POSITIVE, "ratio clip above 1 (DAPO's clip-higher when above clip_low)")
    drop_zero_variance: bool = keyed(True, help="leave out groups whose rewards are all equal (DAPO); counted")
    beta: float = keyed(0.0, NON_NEGATIVE, "KL(policy || reference) coefficient; 0: no reference pass at all")
    kl_in: str = keyed("auto", one_of("auto", "loss", "reward"),
                       "auto: in the reward for reinforce_pp, in the loss otherwise; reward needs reinforce_pp (the "
                       "other kinds give one advantage per answer, with no per-token reward to shape)")
    kl_estimator: str = keyed("k3", one_of("k1", "k2", "k3"), "per-token KL estimator; in the loss k2 or k3 (k1's "
                              "expected gradient there is zero)")
    ppo_epochs: int = keyed(1, AT_LEAST_ONE, "passes over each rollout batch")


def grpo_kl_in(stage) -> str:
    """Where GRPO's KL term goes, `auto` resolved: the reward for reinforce_pp, the loss for the other kinds."""
    if stage.kl_in != "auto":
        return stage.kl_in
    return "reward" if stage.advantage == "reinforce_pp" else "loss"


@dataclass
class RewardConfig:
    kind: str = keyed("auto", one_of("auto", "checker", "rm", "python", "weighted"),
                      "what scores a response in ppo and grpo: the data's task checker, a reward model, your "
                      "function, or a weighted sum; auto: rm for ppo, checker for grpo")
    model: str | None = keyed(None, help="reward=rm: a reward model directory; null: the run's rm (ppo: stage.reward)")
    fn: str | None = keyed(None, help="reward=python: module:function, called as fn(prompts, completions, **fields)")
    weights: dict[str, float] = keyed(None, help="reward=weighted: {checker: 1.0, rm: 0.5, python: 1.0}",
                                      factory=dict)


@dataclass
class EvalStageConfig(StageConfig):
    name: str = "eval"
    policies: list[str] = keyed(None, help="run stages (sft, dpo, ppo) or model paths; []: those the run has",
                                factory=list)
    baseline: str | None = keyed("sft", help="win-rate and KL are measured against it: the run's sft, a path, or null")
    reward: str | None = keyed(None, help="judge: the run's rm, a path, or `none`")
    pairs: str | None = keyed(None, help="preference pairs for the judge's accuracy; default: its own held-out pairs")
    prompts: int = keyed(256, NON_NEGATIVE, "held-out prompts each policy answers (greedy; 0: all)")
    max_prompt_length: int = keyed(512, AT_LEAST_ONE, "longest prompt in tokens")
    max_new_tokens: int = keyed(64, AT_LEAST_ONE, "longest answer in tokens")
    kl_samples: int = keyed(1, AT_LEAST_ONE, "sampled responses per prompt for the KL estimate")
    batch_size: int = keyed(64, AT_LEAST_ONE, "prompts per forward/generate call")


@dataclass
class PipelineConfig:
    """What `recipe=NAME` sets: the stages to run in order. Empty: run the single `stage`."""

    name: str | None = None  # the recipe's name
    stages: list[str] = field(default_factory=list)
    force: list[str] = field(default_factory=list)  # re-run these stages (and so everything downstream); [all]: every one
    objective: str | None = None  # `<stage>.<metric>` from stage.json, returned to a sweeper (Optuna)
    summary: bool = True  # summary.md, plots and the table at the end


SECTION_GROUPS = {"train": TrainConfig, "data": DataConfig, "model": ModelConfig, "peft": PeftConfig}


def stage_schemas() -> dict[str, type]:
    """name -> the dataclass of its stage.* keys, for every registered stage (align/stages/__init__.py)."""
    from align.stages import registry

    return {name: spec.schema for name, spec in registry().items()}


def reads_reward(stage: str) -> bool:
    """Whether the reward group applies to `stage` (`grpo.reward.kind=rm` inside a recipe)."""
    from align.stages import registry

    spec = registry().get(stage)
    return bool(spec and spec.reward)


def section_groups(stage: str) -> dict[str, type]:
    """The groups a recipe may set per stage. The reward group joins them for the stages that read it, unless the
    stage has a key of that name (ppo's stage.reward, its reward model: there the group is set for the recipe)."""
    own = stage_schemas().get(stage)
    clash = own is not None and "reward" in {f.name for f in dataclasses.fields(own)}
    return {**SECTION_GROUPS, **({"reward": RewardConfig} if reads_reward(stage) and not clash else {})}


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


def _section(stage: str, schema: type) -> type:
    groups = {g: _overlay(group, f"{stage.upper()}{group.__name__}Overlay")
              for g, group in section_groups(stage).items()}
    return _overlay(schema, f"{stage.upper()}Section", groups)


@functools.lru_cache(maxsize=1)
def sections() -> dict[str, type]:
    """A recipe's per-stage section of each registered stage: `dpo.beta=0.1`, `sft.train.epochs=2`."""
    return {name: _section(name, schema) for name, schema in stage_schemas().items()}


@dataclass
class SharedConfig:
    stage: Any = MISSING
    run: RunConfig = field(default_factory=RunConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)


@functools.lru_cache(maxsize=1)
def align_schema() -> type:
    """The whole config: the shared groups, and per-stage overrides inside a recipe (see recipes/), one section
    per registered stage, whose unset keys leave the shared value alone."""
    extra = [(name, section, field(default_factory=section)) for name, section in sections().items()]
    return dataclasses.make_dataclass("AlignConfig", extra, bases=(SharedConfig,))


def register() -> None:
    from align import recipes

    cs = ConfigStore.instance()
    cs.store(name="align_schema", node=align_schema())
    for name, schema in stage_schemas().items():
        cs.store(group="stage", name=f"{name}_schema", node=schema)
        if not (config_dir() / "stage" / f"{name}.yaml").is_file():  # a stage from another package: its schema
            cs.store(group="stage", name=name, node=schema(name=name))
    recipes.register(cs)


def config_dir() -> Path:
    """conf/ in a source checkout or editable install; align/conf in a wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "conf", here / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"align's conf/ directory was not found next to {here}")
