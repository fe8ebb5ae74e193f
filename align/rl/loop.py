"""The loop every online RL stage (ppo, grpo) runs on: sampling with the actor, the reference's
log-probs (the actor with its adapter off under LoRA), exact checkpoints and resume, preemption,
the non-finite guard, and the greedy held-out evaluation. A stage subclasses OnlineLoop and writes
`step(prompts) -> stats`, what its checkpoints hold besides the trained models, and how an eval
response is scored."""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from align import checkers, checkpointing, distributed, tracking
from align.eval_metrics import sequence_kl
from align.models.loading import set_use_cache
from align.preemption import Preempted, SignalFlag, TrainingDiverged
from align.rl import rollout
from align.rl.engine import Trainable, device, frozen_engine
from align.rl.watch import overoptimisation

log = logging.getLogger("align")


def on_device_of(model, batch: rollout.Batch, fn) -> torch.Tensor:
    """fn(batch) run where `model`'s weights are (the CPU with stage.frozen_device=cpu), the result back
    beside the batch."""
    where = next(model.parameters()).device
    if where == batch.mask.device:
        return fn(batch)
    return fn(batch.to(where)).to(batch.mask.device)


class OnlineLoop:
    name = "online"
    progress_keys = ("reward/score_mean",)  # shown on the progress bar
    log_keys: tuple = ()  # shown in the console every train.logging_steps

    def __init__(self, cfg, actor: Trainable, reference, peft_actor: bool, tokenizer, checker=None):
        self.cfg, self.s, self.tok, self.checker = cfg, cfg.stage, tokenizer, checker
        self.actor, self.reference, self.peft_actor = actor, reference, peft_actor
        self.pad = tokenizer.pad_token_id
        self.stop_ids = rollout.stop_token_ids(tokenizer, list(self.s.stop_tokens))
        self.synced = cfg.deepspeed.zero_stage == 3 and distributed.world_size() > 1
        self.train_time = 0.0
        self.skipped, self.bad_in_a_row = 0, 0  # non-finite mini-batch updates dropped
        self.gen = torch.Generator().manual_seed(cfg.train.seed + 1)  # mini-batch order
        self.before: dict = {}
        self.warnings: list[dict] = []  # what the watch found (stage.json)
        self._window: bool | None = None  # inside rollout_window: whether ranks generate in lock-step

    # --- what a stage provides ------------------------------------------------------------------
    def trained(self) -> dict[str, Trainable]:
        """The models the loop trains, by checkpoint folder name."""
        return {"actor": self.actor}

    def step(self, prompts: list) -> dict:
        raise NotImplementedError

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def eval_scores(self, batch: rollout.Batch, responses: list[str], items: list) -> dict[str, torch.Tensor]:
        """Per-response scores of a greedy eval batch beside the checker's (e.g. the reward model's)."""
        return {}

    @property
    def has_reference(self) -> bool:
        return self.peft_actor or self.reference is not None

    # --- rollouts -------------------------------------------------------------------------------
    @contextmanager
    def rollout_window(self):
        """Generation and the no-grad passes of the policy that follow it (its own and the reference's log-probs)
        under one gather of the weights (ZeRO-3, when the policy fits: generation_weights); nested use joins the
        open window. Outside ZeRO-3 it changes nothing."""
        if self._window is not None:
            yield
            return
        with generation_weights(self.actor, self.s.gather_for_rollout) as synced:
            self._window = synced
            try:
                yield
            finally:
                self._window = None

    def frozen_models(self) -> tuple:
        """The models a step runs but does not train (a full-weights reference; a stage adds its reward model)."""
        return tuple(m for m in (self.reference,) if m is not None)

    @contextmanager
    def step_window(self):
        """One step (rollout, scoring, update) with every model it runs gathered once under ZeRO-3, when they fit
        (step_weights, stage.gather_for_step); rollout_window then joins it. Outside ZeRO-3 it changes nothing."""
        with step_weights(tuple(self.trained().values()), self.frozen_models(), self.s.gather_for_step) as gathered:
            if self.actor.engine is not None and self.actor.engine in gathered:
                self._window = False  # rollout_window joins: the policy is whole, the ranks generate independently
            try:
                yield
            finally:
                self._window = None

    def sample(self, prompts: list[list[int]], greedy: bool = False) -> rollout.Batch:
        actor = self.actor.module
        set_use_cache(actor, True)
        with self.rollout_window():
            batch = rollout.generate(actor, prompts, pad_id=self.pad, stop_ids=self.stop_ids,
                                     max_new_tokens=self.s.max_new_tokens, temperature=self.s.temperature,
                                     top_p=self.s.top_p, greedy=greedy, synced_gpus=self._window and self.synced,
                                     device=device())
        set_use_cache(actor, False)
        return batch

    @torch.no_grad()
    def reference_logprobs(self, batch, temperature):
        if self.peft_actor:
            with rollout.adapter_disabled(self.actor.module):
                return rollout.response_logprobs(self.actor.module, batch, temperature)[0]
        return on_device_of(self.reference, batch,
                            lambda b: rollout.response_logprobs(self.reference, b, temperature)[0])

    def finite_on_all_ranks(self, *losses) -> bool:
        """False (and counted) when a loss is NaN/inf on any rank; max_bad_steps in a row stop the run."""
        if distributed.all_reduce_scalar(all(bool(torch.isfinite(x).all()) for x in losses), "min"):
            self.bad_in_a_row = 0
            return True
        self.bad_in_a_row += 1
        self.skipped += 1
        log.warning("non-finite %s loss: mini-batch update skipped (%d in a row, %d in all)", self.name,
                    self.bad_in_a_row, self.skipped)
        if self.bad_in_a_row >= self.cfg.train.max_bad_steps:
            raise TrainingDiverged(
                f"{self.name}: {self.bad_in_a_row} non-finite updates in a row (train.max_bad_steps="
                f"{self.cfg.train.max_bad_steps}); stopped. Lower train.lr or check the reward. The last "
                "committed checkpoint (if any) is in checkpoints/.")
        return False

    # --- the loop -------------------------------------------------------------------------------
    def train(self, prompts: list, steps: int, per_rank: int, wandb_run, checkpoints=None, resume_from=None,
              before: dict | None = None) -> list[dict]:
        """`steps` steps of `per_rank` prompts on each rank. Every `train.save_steps` steps, and at SIGTERM/SIGINT,
        the whole loop state goes to checkpoints/checkpoint-N; `resume_from` continues from one exactly (same
        prompts next, same sampling RNG). `before` (the pre-training eval) is kept in the checkpoint."""
        from tqdm.auto import tqdm

        world, rank = distributed.world_size(), distributed.rank()
        g = torch.Generator().manual_seed(self.cfg.train.seed)
        order, cursor, history = torch.randperm(len(prompts), generator=g).tolist(), 0, []
        first, self.before = 0, before or {}
        if resume_from is not None:
            first, order, cursor, history = self.load_state(resume_from, g)  # restores self.before too
            log.info("resuming from %s (step %d of %d)", resume_from, first, steps)
        per_step = per_rank * world
        start = time.perf_counter() - self.train_time
        bar = tqdm(range(first, steps), desc=self.name, disable=not tracking.is_main_process(), initial=first,
                   total=steps)
        with SignalFlag() as flag:
            for step in bar:
                if cursor + per_step > len(order):
                    order, cursor = torch.randperm(len(prompts), generator=g).tolist(), 0
                mine = order[cursor + rank * per_rank : cursor + (rank + 1) * per_rank]
                cursor += per_step
                with self.step_window():
                    stats = self.step([prompts[i] for i in mine])
                history.append(stats)
                self.watch(history, step + 1)
                bar.set_postfix({k.split("/")[-1]: f"{stats[k]:.3f}" for k in self.progress_keys if k in stats})
                if tracking.is_main_process() and (step % self.cfg.train.logging_steps == 0 or step == steps - 1):
                    log.info("step %d/%d: %s", step + 1, steps, self.format(stats))
                    if wandb_run is not None:
                        wandb_run.log({f"train/{k}": v for k, v in stats.items()}, step=step + 1)
                done, stop = step + 1, flag.requested()
                self.train_time = time.perf_counter() - start
                save_steps = self.cfg.train.save_steps
                if checkpoints is not None and (stop or (save_steps > 0 and done % save_steps == 0 and done < steps)):
                    self.save_state(checkpoints / f"checkpoint-{done}", done, order, cursor, history, g)
                if stop:
                    raise Preempted.after_save(self.name, flag, done, checkpoints / f"checkpoint-{done}")
        self.train_time = time.perf_counter() - start
        return history

    @property
    def watched(self) -> tuple[str, str]:
        """(learned reward, checker accuracy) of the rollouts: the keys the watch compares, when both are logged."""
        return "reward/rm", "reward/checker"

    def watch(self, history: list[dict], step: int) -> None:
        """Warn once (console and stage.json) when the learned reward rises while the checker falls."""
        learned, checker = self.watched
        if self.warnings or not all(learned in h and checker in h for h in history):
            return
        message = overoptimisation([h[learned] for h in history], [h[checker] for h in history],
                                   self.s.watch_window)
        if message:
            if tracking.is_main_process():
                log.warning("%s step %d: %s", self.name, step, message)
            self.warnings.append({"kind": "over_optimisation", "step": step, "message": message})

    def format(self, stats: dict) -> str:
        return " ".join(f"{k.split('/')[-1]}={stats[k]:.4g}" for k in self.log_keys if k in stats)

    # --- checkpoints ----------------------------------------------------------------------------
    def save_state(self, folder: Path, step: int, order, cursor: int, history, g: torch.Generator) -> None:
        """The trained models (weights, optimizers, schedules), then the loop: step, prompt order and position,
        every RNG, the stage's own state, the history. Committed last, all ranks done."""
        main = tracking.is_main_process()
        for name, model in self.trained().items():
            model.save_state(folder / name, main)
        if main:
            from safetensors.torch import save_file

            rng = {"prompt_order": g.get_state(), "minibatch_order": self.gen.get_state(), "torch": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state()
            save_file(rng, str(folder / "rng.safetensors"))
            state = {"step": step, "order": order, "cursor": cursor, "history": history, "train_time": self.train_time,
                     "before": self.before, "skipped": self.skipped, "warnings": self.warnings, **self.extra_state()}
            (folder / "loop.json").write_text(json.dumps(state))
        checkpointing.commit_when_all_written(folder, self.cfg.train.keep_checkpoints, main, {"global_step": step})

    def load_state(self, folder, g: torch.Generator):
        from safetensors.torch import load_file

        folder = Path(folder)
        for name, model in self.trained().items():
            model.load_state(folder / name)
        state = json.loads((folder / "loop.json").read_text())
        rng = load_file(str(folder / "rng.safetensors"))
        g.set_state(rng["prompt_order"])
        self.gen.set_state(rng["minibatch_order"])
        torch.set_rng_state(rng["torch"])
        if torch.cuda.is_available() and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"])
        self.train_time = state["train_time"]
        self.before = state["before"]
        self.skipped = state.get("skipped", 0)
        self.warnings = state.get("warnings", [])
        self.load_extra_state(state)
        return state["step"], state["order"], state["cursor"], state["history"]

    # --- held-out evaluation --------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, prompts: list[list[int]], items: list) -> dict:
        """Greedy responses to held-out prompts: their log-ratio to the reference, length, the stage's own scores, the
        task checker's accuracy when the data set has one. `items[i]` is (prompt_text, reference, ...)."""
        rows, responses, chunk = [], [], max(self.cfg.train.batch_size, 32)
        scores: dict[str, list] = {}
        for i in range(0, len(prompts), chunk):
            with self.rollout_window():
                batch = self.sample(prompts[i : i + chunk], greedy=True)
                if self.has_reference:  # log pi - log pi_ref summed over the greedy answer: not a KL estimate
                    # (answers are not sampled), so not named one; the sampled estimate is the eval stage's kl
                    logp, _ = rollout.response_logprobs(self.actor.module, batch)
                    scores.setdefault("greedy_logratio", []).append(
                        sequence_kl(logp, self.reference_logprobs(batch, 1.0), batch.mask))
            text = rollout.decode_responses(self.tok, batch)
            for k, v in self.eval_scores(batch, text, items[i : i + chunk]).items():
                scores.setdefault(k, []).append(v)
            rows.append((batch.mask.sum(1).float(), batch.ended.float()))
            responses += text
        length, ended = (torch.cat(x) for x in zip(*rows))
        out = {k: float(torch.cat(v).float().mean()) for k, v in scores.items()}
        out.update({"response_length": float(length.mean()), "ended": float(ended.mean())})
        if self.checker is not None:
            out["checker_accuracy"] = checkers.accuracy(self.checker, [t[0] for t in items], responses,
                                                        [t[1] for t in items])
        return mean_over_ranks(out)


@contextmanager
def generation_weights(trainable: Trainable, mode: str = "auto"):
    """Under ZeRO-3 every generated token would gather the sharded weights layer by layer from every rank. When
    the whole policy fits (mode auto: its full weights take under a quarter of the free memory; on: always),
    gather it once for the rollout (gathered_unhooked: the idea of DeepSpeed-Chat's hybrid engine). Yields
    whether the ranks must still generate in lock-step (synced_gpus): only when the weights stay sharded."""
    engine = trainable.engine
    if engine is None or engine.zero_optimization_stage() != 3 or mode == "off" or (
            mode == "auto" and not _fits_gathered([engine.module])):
        yield True
        return
    with gathered_unhooked([engine]):
        yield False


@contextmanager
def step_weights(trainables, frozen=(), mode: str = "auto"):
    """Under ZeRO-3 every forward and backward of a step gathers each layer's weights from every rank and frees
    them again, through DeepSpeed's hooks on every module: on a small model or a slow interconnect that costs
    more than the arithmetic (2 CPU ranks: a PPO step 4x its ZeRO-2 time). When the models of a step fit
    (mode auto: their full weights take under a quarter of the free memory; on: always), hold them gathered for
    the whole step (gathered_unhooked); gradients are still reduce-scattered and the optimizer state stays
    sharded. Models whose shards are offloaded to CPU memory (deepspeed=zero3_offload, stage.frozen_device=cpu)
    are left as they are: their memory is what the user asked to save. `frozen`: models only run (frozen(): a
    reward model, a reference). Yields the engines it gathered (none outside ZeRO-3)."""
    engines = [t.engine for t in trainables] + [frozen_engine(m) for m in frozen]
    engines = [e for e in engines if e is not None and e.zero_optimization_stage() == 3 and not _offloaded(e)]
    if not engines or mode == "off" or (mode == "auto" and not _fits_gathered([e.module for e in engines])):
        yield []
        return
    with gathered_unhooked(engines, [t for t in trainables if t.engine in engines]):
        yield engines


def _offloaded(engine) -> bool:
    offload = engine.zero_offload_param()
    return offload is not None and offload.device != "none"


@contextmanager
def gathered_unhooked(engines, trainables=()):
    """The weights of ZeRO-3 `engines` gathered in one collective (per dtype) and ZeRO-3's module hooks taken off,
    as DeepSpeed's own generation context does, so forwards and backwards run on whole weights with no per-layer
    gathers. DeepSpeed's optimizer step re-shards its model's weights: after each step of `trainables` they are
    gathered again, with the new values. On exit the hooks come back and the weights are sharded again."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    seen: dict[int, torch.nn.Parameter] = {}
    for engine in engines:
        for p in engine.module.parameters():
            seen.setdefault(p.ds_id, p)
    params = [seen[k] for k in sorted(seen)]  # the same order on every rank

    def gather() -> None:
        missing = [p for p in params if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
        if missing:
            missing[0].all_gather_coalesced(missing).wait()

    offloads = [_parameter_offload(e) for e in engines]
    for offload in offloads:
        for hook in offload.forward_hooks + offload.backward_hooks:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
    gather()
    for t in trainables:
        t.after_step.append(gather)
    try:
        yield
    finally:
        for t in trainables:
            t.after_step.remove(gather)
        for offload in offloads:
            offload._register_deepspeed_module(offload.module)
        held = [p for p in params if p.ds_status == ZeroParamStatus.AVAILABLE and not p.ds_persist]
        if held:
            held[0].partition(param_list=held)


def _parameter_offload(engine):
    """Where a ZeRO-3 engine keeps its module hooks (as deepspeed.runtime.zero.stage3's generation context finds
    them: the optimizer's parameter offload, or a frozen engine's DeepSpeedZeRoOffload itself)."""
    optimizer = engine.optimizer
    return optimizer.parameter_offload if hasattr(optimizer, "parameter_offload") else optimizer


def _fits_gathered(modules) -> bool:
    """Whether the full weights of `modules` fit to be gathered (_fits_bytes)."""
    return _fits_bytes(sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for m in modules
                           for p in m.parameters()))


def _fits_bytes(full: int) -> bool:
    """Whether `full` bytes take under a quarter of the free memory on every rank: the ranks decide together (a
    collective), since one rank gathering while another keeps ZeRO-3's hooks would leave their collectives
    unmatched."""
    return distributed.all_reduce_scalar(float(_fits_here(full)), "min") == 1.0


def _fits_here(full: int) -> bool:
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
    else:
        import psutil

        free = psutil.virtual_memory().available
    return full < free / 4


def load_reward_model(cfg, ds_config, parent, pad_id: int):
    """The reward model of a stage output (a sequence classifier), frozen: sharded under ZeRO-3, its weights in CPU
    memory with stage.frozen_device=cpu."""
    from omegaconf import OmegaConf
    from transformers import AutoModelForSequenceClassification

    from align.models.loading import load_pretrained
    from align.rl.engine import frozen

    model = load_pretrained(AutoModelForSequenceClassification, str(parent.model), cfg.model,
                            OmegaConf.create({"method": "none"}), num_labels=1)
    model.config.pad_token_id = pad_id
    return frozen(model, cfg, ds_config, cfg.stage.frozen_device == "cpu")


def reward_statistics(parent) -> tuple[float | None, float | None]:
    """(mean, std) of the reward model's scores that its stage recorded, for normalising them; (None, None), with
    a warning, when it recorded none (its scores are then used raw)."""
    stats = parent.info.get("metrics", {})
    mean, std = stats.get("reward_mean"), stats.get("reward_std")
    if mean is None or std is None:
        log.warning("%s records no reward_mean/reward_std; its scores are used raw", parent.path)
        return None, None
    return mean, std


def prompt_items(ds) -> list[tuple[list[int], dict]]:
    """(prompt ids, what a reward reads: prompt_text, reference, fields) per prompt row of a prompt dataset."""
    if ds is None:
        return []
    return [(row["prompt_ids"], {"prompt_text": row["prompt_text"], "reference": row["reference"],
                                 "fields": row.get("fields", "{}")}) for row in ds]


def rollout_checker(checker, responses: list[str], items: list[dict]) -> torch.Tensor:
    """The task checker's score of each sampled response, [N]."""
    return torch.tensor([float(checker(it["prompt_text"], r, it.get("reference"))) for r, it in zip(responses, items)])


def mean_over_ranks(stats: dict) -> dict:
    if not distributed.is_initialized() or distributed.world_size() == 1:
        return stats
    import torch.distributed as dist

    keys = sorted(stats)
    t = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64, device=device())
    dist.all_reduce(t)
    t /= distributed.world_size()
    return dict(zip(keys, t.tolist()))
