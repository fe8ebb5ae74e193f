"""One stage's memory on one GPU: what its footprint (StageSpec.footprint) holds, each term by memory.py, and the
peak: every model's weights and states, plus the larger of the training phase (a micro-batch's activations and
logits) and the sampling phase (the rollout's KV cache, and the vLLM engine's share when it samples), plus the CUDA
context. A stage that samples apart (iterative_dpo) peaks at the larger of its sampling (the whole policy) and its
training."""

from __future__ import annotations

from dataclasses import dataclass, field

from align.config import registry
from align.config.registry import Held
from align.plan import memory
from align.plan.shapes import Shape

TIGHT = 0.9  # above this share of the GPU's memory a plan is tight (fragmentation, allocator caching)


@dataclass
class StagePlan:
    stage: str
    rows: list[tuple[str, float]] = field(default_factory=list)  # (what, bytes per GPU)
    peak: float = 0.0
    phase: str = ""  # which phase peaks: training or sampling
    gpu_memory: float | None = None

    @property
    def verdict(self) -> str:
        if self.gpu_memory is None:
            return "no GPU memory given"
        if self.peak <= TIGHT * self.gpu_memory:
            return "fits"
        return "tight" if self.peak <= self.gpu_memory else "does not fit"


def zero_settings(cfg) -> tuple[int, bool, bool]:
    d = cfg.deepspeed
    return d.zero_stage, d.offload_optimizer == "cpu", d.offload_param == "cpu"


def held_bytes(cfg, shape: Shape, held: Held, gpus: int) -> list[tuple[str, float]]:
    """(what, bytes) of one held model on one GPU: its weights, and with `trains` its gradients and optimizer
    states (a LoRA adapter's in fp32, beside the frozen base)."""
    if held.on_cpu:
        return [(f"{held.role} weights (in CPU memory)", 0.0)]
    zero, off_opt, off_param = zero_settings(cfg)
    b = memory.dtype_bytes(cfg.model.dtype)
    params = shape.params - (0 if not held.score_head or shape.tied else shape.embedding_params) + \
        (shape.hidden if held.score_head else 0)
    method = (held.peft or cfg.peft.method) if held.trains else "none"
    if method == "qlora":
        q = cfg.peft.quant if "quant" in cfg.peft else None
        bits, double = (q.bits, q.double_quant) if q is not None else (4, True)
        base = memory.quantized_weight_bytes(shape, bits, double, b) - (shape.params - params) * b
    else:
        base = params * b
    out = [(f"{held.role} weights", memory.weight_bytes(base, shape.largest_layer_params, zero, gpus, off_param))]
    if not held.trains:
        return out
    if method == "none":
        out.append((f"{held.role} gradients + optimizer", memory.trained_states(params, zero, gpus, off_opt, b)))
        return out
    adapter = shape.lora_params(cfg.peft.r)
    out.append((f"{held.role} LoRA adapter (fp32) + gradients + optimizer",
                adapter * 4 + memory.trained_states(adapter, zero, gpus, off_opt, 4)))
    return out


def plan_stage(cfg, shape: Shape, gpus: int, gpu_memory: float | None) -> StagePlan:
    spec = registry.get(cfg.stage.name)
    fp = spec.footprint(cfg)
    t, b = cfg.train, memory.dtype_bytes(cfg.model.dtype)
    plan = StagePlan(cfg.stage.name, gpu_memory=gpu_memory)
    for held in fp.models:
        plan.rows += held_bytes(cfg, shape, held, gpus)
    models = sum(v for _, v in plan.rows)
    trained = [h for h in fp.models if h.trains]
    vocab_head = any(not h.score_head for h in trained)  # a classifier has no logits over the vocabulary
    length = t.max_length if fp.train_tokens is None else fp.train_tokens
    tokens = t.batch_size * fp.pair_rows * length
    train = 0.0
    if trained and tokens:
        ckpt = "activation checkpointing" if cfg.model.gradient_checkpointing else "no checkpointing"
        rows = f"{t.batch_size} x {fp.pair_rows}" if fp.pair_rows > 1 else f"{t.batch_size}"
        # every trained model's forward runs before the first backward (PPO: actor and critic), so their activations
        # are held together; under checkpointing one layer at a time is recomputed, counted once
        parts = [memory.activation_parts(shape, tokens, cfg.model.gradient_checkpointing, b,
                                         lora_r=cfg.peft.r if (h.peft or cfg.peft.method) != "none" else 0,
                                         lora_dropout=cfg.peft.dropout > 0) for h in trained]
        recompute = max(r for _, r in parts)
        for n, (h, (kept, _)) in enumerate(zip(trained, parts)):
            who = f"{h.role} activations" if len(trained) > 1 else "activations"
            plan.rows.append((f"{who} ({rows} x {length} tokens, {ckpt})", kept + (recompute if n == 0 else 0.0)))
        logits = memory.logits_bytes(shape, tokens, fp.chunked_logits) if vocab_head else 0.0
        plan.rows.append(("logits (" + ("chunked" if fp.chunked_logits else "whole micro-batch") + ", fp32)", logits))
        train = sum(kept for kept, _ in parts) + recompute + logits
    sample, resident = _sampling_rows(cfg, shape, fp, plan, gpu_memory, b)
    context = memory.CUDA_CONTEXT
    plan.rows.append(("CUDA context and allocator reserve", context))
    training_peak, sampling_peak = models + train + resident, models + sample
    if fp.sampling_apart:  # the whole policy (and judge) sample first; training loads afterwards
        whole = shape.params * b + sum(shape.params * b for h in fp.models if h.role == "reward model")
        plan.rows.append(("sampling: the whole policy (and judge) before training loads", whole))
        sampling_peak = whole + sample
    plan.phase = "sampling" if sampling_peak > training_peak else "training"
    plan.peak = max(sampling_peak, training_peak) + context
    return plan


def _sampling_rows(cfg, shape: Shape, fp, plan: StagePlan, gpu_memory: float | None, b: int) -> tuple[float, float]:
    """The rollout's KV cache (and with rollout.engine=vllm the engine's reserved share), appended to the plan's
    rows: (what sampling holds, what stays held while the step trains). On a GPU the engine sleeps while the step
    trains (weights and KV cache released: rollout.sleep=auto/on); with rollout.sleep=off its share stays."""
    if not fp.rollout_sequences:
        return 0.0, 0.0
    kv = memory.kv_cache_bytes(shape, fp.rollout_sequences, fp.rollout_tokens, b)
    plan.rows.append((f"rollout KV cache ({fp.rollout_sequences} x {fp.rollout_tokens} tokens)", kv))
    engine = cfg.get("rollout", {}).get("engine", "hf") if registry.get(cfg.stage.name).reads_rollout else "hf"
    if engine == "vllm" and gpu_memory is not None:
        share = cfg.rollout.gpu_memory_utilization * gpu_memory
        awake = cfg.rollout.get("sleep", "auto") == "off"
        plan.rows.append((f"vLLM engine share (rollout.gpu_memory_utilization={cfg.rollout.gpu_memory_utilization}; "
                          + ("kept while training: rollout.sleep=off)" if awake else "released while training)"),
                          share))
        return max(share, kv), share if awake else 0.0
    return kv, 0.0
