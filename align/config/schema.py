"""The config schema: Hydra structured configs, one dataclass per shared group (run, train, model, data, peft,
deepspeed, logger, reward, rollout, env, pipeline) and the base of every stage's own schema (StageConfig; each stage declares
its subclass in its module under align/stages).

Typed fields make Hydra reject `train.lr=abc` or an unknown key with a clear message before anything loads; the
`Check` beside each key (`keyed`) gives its allowed values, applied by align/config/rules.py. The YAML files in
conf/ pick values; these classes define what may be set. Nothing else of align is imported here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING


@dataclass(frozen=True)
class Check:
    """The allowed values of one key, declared beside it (`keyed`) and applied before anything loads
    (align/config/rules.py): a numeric range, a set of names, or both (e.g. -1 or >= 1). None passes
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
CHECKERS = ("demo", "exact", "regex", "json", "gym")  # data.checker: align/tasks/checkers.py implements each
REWARD_COMPONENTS = ("checker", "rm", "python", "env")  # what reward=weighted sums (align/rewards)
REWARD_KINDS = ("auto", *REWARD_COMPONENTS, "weighted")
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
    train: str = keyed("demo", help="file, save_to_disk folder, hub name, `demo` for the bundled demo, "
                                    "`task:<name>` for a task of the zoo (data=task/<name>), or `gym:<task>` for "
                                    "a reasoning-gym task (data=gym:<task>)")
    eval: str | None = keyed(None, help="same forms; null: data.eval_fraction, or the demo's eval split")
    eval_fraction: float = keyed(0.0, FRACTION, "share of data.train held out for evaluation when data.eval is null")
    format: str = keyed("auto", one_of(*DATA_FORMATS), "instruction format; auto: detected per row")
    split: str = keyed("train", help="split of a hub dataset or DatasetDict folder")
    eval_split: str = keyed("test", help="split read for data.eval")
    dedup: bool = keyed(False, help="drop exact duplicate rows")
    on_error: str = keyed("raise", one_of("raise", "skip"), "a bad row stops the run (raise) or is skipped and counted")
    max_rows: int = keyed(0, NON_NEGATIVE, "use the first N training rows; 0: all")
    checker: str | None = keyed("auto", one_of("auto", *CHECKERS),
                                "task checker; auto: demo on the bundled data, a zoo or gym task's own, else none")
    checker_pattern: str | None = keyed(None, help="regular expression for checker=regex")
    gym: dict[str, Any] = keyed(None, help="data=gym:<task>: the reasoning-gym task's options (data.gym.max_terms=2)",
                                factory=dict)


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
class RewardConfig:
    kind: str = keyed("auto", one_of(*REWARD_KINDS),
                      "what scores a response in ppo and grpo: the data's task checker, a reward model, your "
                      "function, the environment's reward (env=python), or a weighted sum; auto: the stage's own "
                      "default (its StageSpec.default_reward; grpo with an environment: env)")
    model: str | None = keyed(None, help="reward=rm: a reward model directory; null: the run's rm (ppo: stage.reward)")
    fn: str | None = keyed(None, help="reward=python: module:function, called as fn(prompts, completions, **fields)")
    weights: dict[str, float] = keyed(None, help="reward=weighted: {checker: 1.0, rm: 0.5, python: 1.0, env: 1.0}",
                                      factory=dict)


ENV_KINDS = ("none", "python")


@dataclass
class EnvConfig:
    """What an episode runs against in stage=grpo (docs/environments.md): none, one answer per prompt; python, a
    class of yours that answers the model's turns (a tool) until the episode is done."""

    kind: str = keyed("none", one_of(*ENV_KINDS), "none: one answer per prompt; python: multi-turn episodes with env.cls")
    cls: str | None = keyed(None, help="env=python: module:Class, importable from the working directory or "
                                       "PYTHONPATH; one instance per episode, Class(**env.kwargs)")
    kwargs: dict[str, Any] = keyed(None, help="keyword arguments of env.cls", factory=dict)
    timeout_s: float = keyed(30.0, POSITIVE, "the longest one reset() or step() call may take; past it the episode "
                                             "fails (stops the run, or is dropped and counted with data.on_error=skip)")


ROLLOUT_ENGINES = ("auto", "hf", "vllm")
IS_CORRECTIONS = ("none", "token_tis", "seq_mask")  # align/rl/mismatch.py implements each


@dataclass
class RolloutConfig:
    """What samples the online stages' rollouts (ppo, grpo) and their held-out eval, and how the update corrects
    for the sampler's own numerics (docs/rollouts.md)."""

    engine: str = keyed("auto", one_of(*ROLLOUT_ENGINES),
                        "hf: transformers' generate() on the trained model; vllm: a vLLM engine in each training "
                        "process, given the policy's weights after every optimizer step; auto: vllm when it is "
                        "installed and a GPU is present, else hf")
    gpu_memory_utilization: float = keyed(0.3, Check(0, 1, low_open=True),
                                          "vllm: the share of the GPU's memory its weights and KV cache may take")
    tensor_parallel_size: int = keyed(1, AT_LEAST_ONE,
                                      "vllm: GPUs one engine spans (consecutive ranks sample the same prompts "
                                      "together); must divide the number of ranks")
    seed: int | None = keyed(None, NON_NEGATIVE, "vllm: sampling seed (null: train.seed); each rank draws its own "
                                                 "per-request seeds from it")
    sleep: str = keyed("auto", one_of("auto", "on", "off"),
                       "vllm: release its weights and KV cache while the step trains (auto: on a GPU; a CPU "
                       "engine cannot sleep)")
    cpu_kv_cache_gb: int = keyed(1, AT_LEAST_ONE, "vllm on a CPU: the KV cache's size in GiB")
    is_correction: str = keyed("token_tis", one_of(*IS_CORRECTIONS),
                               "vllm: how the update corrects for the engine's log-probs differing from the trainer's: "
                               "token_tis weighs each token by min(pi_train/pi_engine, is_token_cap); seq_mask leaves "
                               "out answers whose sequence ratio is past is_seq_bound; none. hf samples with the "
                               "trained model itself: nothing to correct")
    is_token_cap: float = keyed(2.0, Check(low=1), "token_tis: the largest weight of one token")
    is_seq_bound: float = keyed(2.0, Check(low=1, low_open=True),
                                "seq_mask: answers whose ratio prod(pi_train/pi_engine) is outside [1/bound, bound] "
                                "are left out")


@dataclass
class PipelineConfig:
    """What `recipe=NAME` sets: the stages to run in order. Empty: run the single `stage`."""

    name: str | None = None  # the recipe's name
    stages: list[str] = field(default_factory=list)
    force: list[str] = field(default_factory=list)  # re-run these stages (and so everything downstream); [all]: every one
    objective: str | None = None  # `<stage>.<metric>` from stage.json, returned to a sweeper (Optuna)
    summary: bool = True  # summary.md, plots and the table at the end


@dataclass
class PlanConfig:
    """`python -m align plan`: the GPUs the memory plan is for (and the preflight of a stage about to load)."""

    gpus: int | None = keyed(None, AT_LEAST_ONE, "GPUs the run shards over; null: the visible GPUs (1 without)")
    gpu_memory: str | None = keyed(None, help="memory of one GPU, e.g. 80GB, 80GiB, 24000MB; null: the visible "
                                              "GPUs' (no verdict without a GPU)")
    strict: bool = keyed(False, help="a stage whose plan does not fit the GPUs is refused before it loads "
                                     "(false: a warning)")


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
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)


