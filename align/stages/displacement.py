"""DPO's likelihood-displacement guard: a trainer callback that warns (once, also into stage.json) when the chosen
answers' log-probability falls while the margin grows. Its own module so that importing a stage's SPEC (every
command does, `plan` and `--cfg` included) does not import transformers' Trainer, PEFT and DeepSpeed."""

from __future__ import annotations

import logging

from transformers import TrainerCallback

log = logging.getLogger("align")


def displacement(chosen_shifts: list[float], margins: list[float], bound: float | None,
                 against: str = "the reference's") -> str | None:
    """Likelihood displacement at the latest logged step: the chosen answers' log-prob (summed over the answer,
    mean over pairs) has fallen more than `bound` nats below the reference's while the margin grew past its
    first logged value. None when not (or no bound)."""
    if bound is None or not chosen_shifts or len(margins) < 2:
        return None
    shift, margin = chosen_shifts[-1], margins[-1]
    if shift < -bound and margin > margins[0]:
        return (f"likelihood displacement: the chosen answers' log-probability is {shift:.2f} nats below "
                f"{against} (bound {bound:g}) while the margin grew from {margins[0]:.3f} to {margin:.3f} - the "
                "policy wins the pairs by pushing both answers down, which usually lowers answer quality. Add an NLL "
                "term (sft in stage.loss_type: [sigmoid,sft] is the default, [simpo,sft] for SimPO), raise "
                "stage.beta or lower train.lr")
    return None


WINDOW = 10


class DisplacementWatch(TrainerCallback):
    """Each logged training step: the mean change of the chosen answers' log-probs against the reference
    (TRL logs rewards/chosen = beta * that change), or with no reference the mean over the last WINDOW logged
    steps against that over the first (one batch's log-prob varies by a nat or two from the next's). The first
    time displacement() fires, the console warns; the warning goes to stage.json."""

    def __init__(self, beta: float, bound: float | None, reference: bool = True):
        self.beta, self.bound, self.reference = beta, bound, reference
        self.shifts: list[float] = []
        self.logps: list[float] = []  # no reference: the chosen answers' log-prob at each logged step
        self.margins: list[float] = []
        self.warnings: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "rewards/chosen" not in logs or "rewards/margins" not in logs or "eval_loss" in logs:
            return
        if self.reference:
            self.shifts.append(logs["rewards/chosen"] / self.beta)
        else:  # no reference: the last logged steps against the first (each a mean over up to 10 batches)
            self.logps.append(logs["logps/chosen"])
            w = max(1, min(WINDOW, len(self.logps) // 2))
            self.shifts.append(sum(self.logps[-w:]) / w - sum(self.logps[:w]) / w)
        self.margins.append(logs["rewards/margins"])
        message = displacement(self.shifts, self.margins, self.bound,
                               "the reference's" if self.reference else "the first logged steps'")
        if message and not self.warnings and state.is_world_process_zero:
            log.warning("dpo step %d: %s", state.global_step, message)
        if message and not self.warnings:
            self.warnings.append({"kind": "likelihood_displacement", "step": state.global_step,
                                  "chosen_logp_change": round(self.shifts[-1], 4), "margin": round(self.margins[-1], 4),
                                  "message": message})

    def metrics(self) -> dict:
        if not self.shifts:
            return {}
        return {"train_chosen_logp_change": self.shifts[-1], "train_min_chosen_logp_change": min(self.shifts)}
