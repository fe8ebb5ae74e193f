"""DPO: direct preference optimisation on TRL's DPOTrainer, from the run's SFT output.

The reference is the starting model, frozen. With LoRA/QLoRA the trainer attaches a fresh adapter
and the reference is the same weights with the adapter switched off (no second copy in memory).
An SFT output that is itself a LoRA adapter is merged into its base first (align.models.loading),
so the fresh DPO adapter trains on top of what SFT learned, never a no-op on a frozen copy. With
full weights the reference is a second copy, loaded from the same directory (or none at all with
`stage.precompute_ref_logps=true`).

`stage.loss_type=simpo` or `orpo` needs no reference at all: each answer is scored by its mean per-token
log-probability (align/rl/reference_free.py), nothing is loaded or computed for a reference, and ORPO (which adds
the SFT loss on the chosen answers) may start from the base model (`stage.init=base`).

Order matters for ZeRO-3: the trainer arguments (which carry the DeepSpeed config) exist before
any model is built, so transformers builds the models already sharded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any
from unittest import mock

import torch

from omegaconf import DictConfig, ListConfig

from align.config.registry import Footprint, Held, StageSpec, init_parent
from align.config.rules import fmt
from align.config.schema import NON_NEGATIVE, POSITIVE, Check, StageConfig, keyed, one_of
from align.data.loader import dpo_datasets
from align.models.loading import cast_trainable, load_tokenizer, resolve_name, set_use_cache
from align.rl.reference_free import REFERENCE_FREE, answer_logps, chosen_nll, orpo, simpo
from align.run.stage_run import StageResult, StageRun
from align.stages.common import (
    max_length,
    numeric_metrics,
    policy_and_reference,
    preference_metrics,
    save_and_commit,
    start_from,
    trainer_metrics,
    training_arguments,
)

log = logging.getLogger("align")


DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm", *REFERENCE_FREE)
# stage.beta=null resolves to: the loss's own scale (SimPO's beta multiplies a mean per-token log-prob; ORPO's is
# the weight of its odds-ratio term, lambda in the paper)
DEFAULT_BETA = {"simpo": 2.0, "orpo": 0.1}
REFERENCE_BETA = 0.1


@dataclass
class DPOStageConfig(StageConfig):
    name: str = "dpo"
    beta: float | None = keyed(None, POSITIVE, "strength of the pull toward the reference (higher: stay closer); "
                                              "simpo: the reward scale; orpo: the odds-ratio term's weight; null: "
                                              "0.1, simpo 2.0, orpo 0.1")
    loss_type: Any = keyed(None, one_of(*DPO_LOSS_TYPES),
                           "one of the DPO losses, or a list combined with loss_weights; the default adds an NLL term "
                           "on the chosen answer to the sigmoid loss (plain sigmoid pushes the chosen answers down too)",
                           factory=lambda: ["sigmoid", "sft"])
    loss_weights: list[float] | None = keyed(None, NON_NEGATIVE, "one weight per loss_type entry")
    simpo_gamma: float = keyed(1.0, NON_NEGATIVE, "simpo: the target reward margin between chosen and rejected")
    label_smoothing: float = keyed(0.0, Check(0, 0.5, high_open=True),
                                   "robust / exo_pair / aot: assumed share of flipped labels")
    precompute_ref_logps: bool = keyed(False, help="score the data with the reference once, then drop it from memory")
    displacement_bound: float | None = keyed(
        2.0, POSITIVE, "warn when the chosen answers' log-prob falls this many nats below the reference's while the "
                       "margin grows (likelihood displacement); null: no check")

# TRL's metric names -> stage.json names (prefixed with eval_ or train_)
METRICS = {
    "rewards/chosen": "rewards_chosen",
    "rewards/rejected": "rewards_rejected",
    "rewards/accuracies": "accuracy",
    "rewards/margins": "margin",
    "logps/chosen": "logps_chosen",
    "logps/rejected": "logps_rejected",
}


def loss_types(stage_cfg) -> list[str]:
    value = stage_cfg.loss_type
    names = list(value) if isinstance(value, (list, tuple, ListConfig)) else [str(value)]
    unknown = [n for n in names if n not in DPO_LOSS_TYPES]
    if unknown or not names:
        raise ValueError(f"stage.loss_type {unknown or names} is not a DPO loss; choose from {', '.join(DPO_LOSS_TYPES)}"
                         " (a list combines several, e.g. stage.loss_type=[sigmoid,sft])")
    weights = stage_cfg.loss_weights
    if weights is not None and len(weights) != len(names):
        raise ValueError(f"stage.loss_weights has {len(weights)} values for {len(names)} loss types {names}")
    return names


def resolved_beta(stage_cfg, names: list[str]) -> float:
    """stage.beta, or with null the scale of the loss: SimPO's and ORPO's own, else DPO's 0.1."""
    if stage_cfg.beta is not None:
        return float(stage_cfg.beta)
    return next((DEFAULT_BETA[n] for n in names if n in REFERENCE_FREE), REFERENCE_BETA)


def run(cfg: DictConfig) -> StageResult:
    names = loss_types(cfg.stage)
    free = any(n in REFERENCE_FREE for n in names)
    beta = resolved_beta(cfg.stage, names)
    stage = StageRun(cfg)
    parent, source = start_from(cfg, "sft", cfg.stage.init)

    tokenizer = load_tokenizer(resolve_name(source), cfg.model)
    length = max_length(cfg, tokenizer)
    train_ds, eval_ds, report = dpo_datasets(cfg.data, tokenizer, length, cfg.train.seed)
    log.info("data: %d train pairs, %d eval pairs; %s", report.train_rows, report.eval_rows, report.errors.summary())

    stage.prepare_checkpoints()
    if cfg.stage.precompute_ref_logps and not free:  # TRL caches the reference log-probs next to the data
        train_ds, eval_ds = stage.shared_datasets(train_ds, eval_ds)
    args = trainer_arguments(cfg, stage, names, length, has_eval=eval_ds is not None)
    model, ref_model, peft_config = policy_and_reference(cfg, source, reference=not free)

    stage.start_logging()
    from align.stages.displacement import DisplacementWatch  # transformers' Trainer: imported when a stage runs

    watch = DisplacementWatch(beta, cfg.stage.displacement_bound, reference=not free)
    trainer = build_trainer(free, cfg.stage.simpo_gamma, model=model, ref_model=ref_model, args=args,
                            train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
                            peft_config=peft_config)
    if cfg.peft.method == "qlora":  # TRL casts adapters to bf16; keep them in the compute dtype (see cast_trainable)
        cast_trainable(trainer.model)
    trainer.add_callback(watch)
    result = stage.train(trainer)

    metrics = trainer_metrics(stage, trainer, result)
    metrics.update(preference_metrics(trainer, METRICS, evaluate=eval_ds is not None))
    metrics.update(watch.metrics())
    metrics.update(report.metrics())
    metrics["beta"] = beta
    metrics = numeric_metrics(metrics)

    set_use_cache(trainer.model, True)
    return save_and_commit(stage, trainer, tokenizer, parent, metrics,
                           warnings=watch.warnings)


def trainer_arguments(cfg, stage: StageRun, names: list[str], length: int, has_eval: bool):
    """TRL's DPOConfig for these losses: beta resolved per loss, and with a reference-free loss TRL told that the
    reference log-probs are precomputed (so it builds no reference)."""
    from trl import DPOConfig

    free = any(n in REFERENCE_FREE for n in names)
    return DPOConfig(
        **training_arguments(cfg, stage, has_eval),
        max_length=length,
        beta=resolved_beta(cfg.stage, names),
        loss_type=names,
        loss_weights=list(cfg.stage.loss_weights) if cfg.stage.loss_weights is not None else None,
        label_smoothing=cfg.stage.label_smoothing,
        precompute_ref_log_probs=cfg.stage.precompute_ref_logps or free,  # with none: TRL builds no reference
        prediction_loss_only=True,  # evaluation needs the loss and the logged statistics, not the logits
        disable_dropout=True,
        dataset_num_proc=None,
    )


def build_trainer(reference_free: bool, simpo_gamma: float, **kwargs):
    """TRL's DPOTrainer on align's pretokenized rows; with a reference-free loss, one that never builds, runs or
    precomputes a reference (TRL is told the reference log-probs are precomputed, so it loads none; the precompute
    pass is skipped, and so is the hash of the weights that names its cache, which would copy every weight)."""
    from trl import DPOTrainer
    from trl.trainer import dpo_trainer

    class PretokenizedDPOTrainer(DPOTrainer):
        """align encodes prompt/chosen/rejected itself (any chat template, errors naming the row)."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    if not reference_free:
        return PretokenizedDPOTrainer(**kwargs)

    class ReferenceFreeTrainer(PretokenizedDPOTrainer):
        def _precompute_ref_logps(self, dataset, name, batch_size):
            return dataset

        def _compute_loss(self, model, inputs, return_outputs):
            return reference_free_loss(self, model, inputs, return_outputs, simpo_gamma)

    with mock.patch.object(dpo_trainer, "hash_module", lambda module: "no reference"):
        return ReferenceFreeTrainer(**kwargs)


def reference_free_loss(trainer, model, inputs, return_outputs: bool, simpo_gamma: float):
    """The loss of `trainer.loss_types` (simpo or orpo, optionally with sft) on one batch of [chosen; rejected]
    rows, from the policy's log-probs alone; logs TRL's pair statistics with rewards = beta x mean token logp."""
    model_kwargs = {k: v for k, v in inputs.items() if k not in ("completion_mask", "ref_chosen_logps",
                                                                  "ref_rejected_logps")}
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    mask = inputs["completion_mask"][:, 1:]
    outputs = model(**model_kwargs, labels=labels, use_cache=False, fused_lm_head=True)
    per_token = outputs.log_probs[:, -mask.size(1):]
    summed, mean = answer_logps(per_token, mask)
    chosen, rejected = mean.chunk(2)
    loss = 0.0
    for name, weight in zip(trainer.loss_types, trainer.loss_weights, strict=True):
        if name == "simpo":
            term = simpo(chosen, rejected, trainer.beta, simpo_gamma).mean()
        elif name == "orpo":
            term = chosen_nll(per_token, mask) + orpo(chosen, rejected, trainer.beta).mean()
        else:  # sft
            term = chosen_nll(per_token, mask)
        loss = loss + weight * term
    log_pair_statistics(trainer, trainer.beta * mean.detach(), summed.detach())
    if return_outputs:
        with torch.no_grad():
            return loss, model(**model_kwargs)
    return loss


def log_pair_statistics(trainer, rewards, summed_logps) -> None:
    """TRL's rewards/* and logps/* statistics of one batch, gathered over ranks."""
    store = trainer._metrics["train" if trainer.model.training else "eval"]
    chosen, rejected = (trainer.accelerator.gather(t) for t in rewards.chunk(2))
    store["rewards/chosen"].append(chosen.mean().item())
    store["rewards/rejected"].append(rejected.mean().item())
    store["rewards/accuracies"].append((chosen > rejected).float().mean().item())
    store["rewards/margins"].append((chosen - rejected).mean().item())
    logps_chosen, logps_rejected = (trainer.accelerator.gather(t) for t in summed_logps.chunk(2))
    store["logps/chosen"].append(logps_chosen.mean().item())
    store["logps/rejected"].append(logps_rejected.mean().item())


def checks(cfg) -> list[str]:
    """Rules between dpo's keys, and with ZeRO (align/config/rules.py runs them before anything loads)."""
    out, s = [], cfg.stage
    losses = list(s.loss_type) if isinstance(s.loss_type, ListConfig) else [s.loss_type]
    if s.loss_weights is not None and len(s.loss_weights) != len(losses):
        out.append(f"stage.loss_weights={fmt(s.loss_weights)} needs one weight per stage.loss_type entry "
                   f"({fmt(losses)}: {len(losses)})")
    free = [n for n in losses if n in REFERENCE_FREE]
    if free and (len(free) > 1 or any(n not in (*REFERENCE_FREE, "sft") for n in losses)):
        out.append(f"stage.loss_type={fmt(losses)}: {' and '.join(free)} score answers without a reference and combine "
                   "only with sft (e.g. stage.loss_type=[simpo,sft]); train a reference loss in a separate run")
    if s.precompute_ref_logps and cfg.deepspeed.zero_stage == 3 and not free:
        # TRL wraps the policy in a second (inference) ZeRO-3 engine for the precompute pass. Measured on 2 ranks:
        # the training diverges from ZeRO-2's from step 2 on and the saved adapter no longer reproduces the
        # trained model's logits (tests/test_supported.py; ZeRO-2 stays allowed, tests/test_zero_matrix.py).
        out.append("stage.precompute_ref_logps=true does not work under ZeRO-3 (TRL shards the policy a second "
                   "time for the reference pass, and the trained weights come out wrong); use deepspeed=zero2 "
                   "(or zero1) with it, or keep ZeRO-3 and set stage.precompute_ref_logps=false")
    return out


def footprint(cfg) -> Footprint:
    """The policy, and a frozen copy as the reference unless LoRA (adapter off), precomputed log-probs or a
    reference-free loss leave it out; chosen and rejected in one micro-batch."""
    free = any(n in REFERENCE_FREE for n in loss_types(cfg.stage))
    copy = cfg.peft.method == "none" and not cfg.stage.precompute_ref_logps and not free
    return Footprint((Held("policy", trains=True), *([Held("reference")] if copy else [])), pair_rows=2)


SPEC = StageSpec(
    name="dpo", schema=DPOStageConfig, run=run, parents=init_parent("sft"), checks=checks, footprint=footprint, lr={"tiny": 3e-4, "full": 5e-7, "adapter": 5e-6}, policy=True,
    headline=("first_loss", "last_loss", "eval_accuracy", "eval_margin", "train_chosen_logp_change"))
