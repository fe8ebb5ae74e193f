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

from align.data.prompts import Prompt
from align.models import distributed
from align.models.distributed import mean_over_ranks
from align.models.loading import set_use_cache
from align.models.metrics import sequence_kl
from align.rl import rollout, vllm_engine
from align.rl.engine import Trainable, device
from align.rl.gather import generation_weights, step_weights
from align.rl.shaping import shape_scores
from align.rl.turn_cache import TurnCache
from align.rl.watch import overoptimisation
from align.run import checkpointing, tracking
from align.run.preemption import Preempted, SignalFlag, TrainingDiverged
from align.tasks import checkers

log = logging.getLogger("align")


def on_device_of(model, batch: rollout.Batch, fn) -> torch.Tensor:
    """fn(batch) run where `model`'s weights are (the CPU with stage.frozen_device=cpu), the result back
    beside the batch."""
    where = next(model.parameters()).device
    if where == batch.mask.device:
        return fn(batch)
    return fn(batch.to(where)).to(batch.mask.device)


@torch.no_grad()
def reward_model_scores(rm, batch: rollout.Batch) -> torch.Tensor:
    """A reward model's scores of the batch's answers: rm is (model, mean, std) as stages/online.load_reward_model
    gives it, the raw scores normalised with that mean and std."""
    model, mean, std = rm
    raw = on_device_of(model, batch, lambda b: rollout.sequence_scores(model, b))
    return shape_scores(raw, batch.ended, mean=mean, std=std)


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
        self.vllm = None  # rollout.engine=vllm: the colocated engine that samples
        if vllm_engine.resolve(cfg.rollout.engine) == "vllm":
            seed = cfg.train.seed if cfg.rollout.seed is None else cfg.rollout.seed
            self.vllm = vllm_engine.VLLMEngine(actor.module, tokenizer, cfg.rollout, seed=seed,
                                                 max_len=self.s.max_prompt_length + self.longest_rollout())

    # --- what a stage provides ------------------------------------------------------------------
    def trained(self) -> dict[str, Trainable]:
        """The models the loop trains, by checkpoint folder name."""
        return {"actor": self.actor}

    def step(self, prompts: list[Prompt]) -> dict:
        raise NotImplementedError

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def eval_scores(self, batch: rollout.Batch, responses: list[str], prompts: list[Prompt]) -> dict[str, torch.Tensor]:
        """Per-response scores of a greedy eval batch beside the checker's (e.g. the reward model's)."""
        return {}

    def longest_rollout(self) -> int:
        """The most tokens a rollout adds after its prompt (an episode's turns, with a stage that runs them)."""
        return self.s.max_new_tokens

    def answer(self, prompts: list[Prompt]) -> tuple[rollout.Batch, list[str], dict]:
        """Greedy answers to held-out prompts: the batch, each answer's text (what the checker reads), and per-answer
        scores of the stage's own beside the eval's (a stage running episodes: the environment's reward)."""
        batch = self.sample([p.ids for p in prompts], greedy=True)
        return batch, rollout.decode_responses(self.tok, batch), {}

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

    def sample(self, prompts: list[list[int]], greedy: bool = False, max_new_tokens: int | None = None,
               more_turns: bool = False, turns: TurnCache | None = None) -> rollout.Batch:
        """One answer per prompt (at most `max_new_tokens`, stage.max_new_tokens by default), from generate() or the
        vLLM engine; `more_turns`: the rollout goes on (an episode's next turn), so the engine stays awake; `turns`:
        generate() reuses the KV cache of the episodes' previous turn."""
        max_new_tokens = max_new_tokens or self.s.max_new_tokens
        if self.vllm is not None:
            return self.sample_on_engine(prompts, greedy, max_new_tokens, more_turns)
        actor = self.actor.module
        set_use_cache(actor, True)
        with self.rollout_window():
            batch = rollout.generate(actor, prompts, pad_id=self.pad, stop_ids=self.stop_ids,
                                     max_new_tokens=max_new_tokens, temperature=self.s.temperature,
                                     top_p=self.s.top_p, greedy=greedy, synced_gpus=self._window and self.synced,
                                     device=device(), turns=turns)
        set_use_cache(actor, False)
        return batch

    @torch.no_grad()
    def sample_on_engine(self, prompts: list[list[int]], greedy: bool, max_new_tokens: int,
                         more_turns: bool = False) -> rollout.Batch:
        """Sample on the vLLM engine, first giving it the policy's weights when an optimizer step changed them;
        a training rollout then lets it sleep (GPU) while the step trains."""
        if self.vllm.version != self.actor.updates:
            with self.rollout_window():  # ZeRO-3: the gather for the rollout's passes serves the sync too
                self.vllm.sync(self.actor.module, self.actor.updates)
        batch = self.vllm.generate(prompts, pad_id=self.pad, stop_ids=self.stop_ids,
                                     max_new_tokens=max_new_tokens, temperature=self.s.temperature,
                                     top_p=self.s.top_p, greedy=greedy, device=device())
        if not greedy and not more_turns:
            self.vllm.sleep()
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
    def train(self, prompts: list[Prompt], steps: int, per_rank: int, wandb_run, checkpoints=None, resume_from=None,
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

        def draw() -> list[Prompt]:  # this rank's next per_rank prompts; a new epoch's order when they run out
            nonlocal order, cursor
            if cursor + per_step > len(order):
                order, cursor = torch.randperm(len(prompts), generator=g).tolist(), 0
            mine = order[cursor + rank * per_rank : cursor + (rank + 1) * per_rank]
            cursor += per_step
            return [prompts[i] for i in mine]

        self.draw_prompts = draw  # a step that samples more rounds (grpo's dynamic sampling) draws from here too
        with SignalFlag() as flag:
            for step in bar:
                with self.step_window():
                    stats = self.step(draw())
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
            if self.vllm is not None:
                state["engine_calls"] = self.vllm.calls
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
        if self.vllm is not None:
            self.vllm.version = None  # the weights loaded are newer than the engine's
            self.vllm.calls = state.get("engine_calls", 0)
        self.train_time = state["train_time"]
        self.before = state["before"]
        self.skipped = state.get("skipped", 0)
        self.warnings = state.get("warnings", [])
        self.load_extra_state(state)
        return state["step"], state["order"], state["cursor"], state["history"]

    # --- held-out evaluation --------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, prompts: list[Prompt]) -> dict:
        """Greedy responses to held-out prompts: their log-ratio to the reference, length, the stage's own scores, the
        task checker's accuracy when the data set has one."""
        rows, responses, chunk = [], [], max(self.cfg.train.batch_size, 32)
        scores: dict[str, list] = {}
        for i in range(0, len(prompts), chunk):
            with self.rollout_window():
                batch, text, own = self.answer(prompts[i : i + chunk])
                if self.has_reference:  # log pi - log pi_ref summed over the greedy answer: not a KL estimate
                    # (answers are not sampled), so not named one; the sampled estimate is the eval stage's kl
                    logp, _ = rollout.response_logprobs(self.actor.module, batch)
                    scores.setdefault("greedy_logratio", []).append(
                        sequence_kl(logp, self.reference_logprobs(batch, 1.0), batch.mask))
            for k, v in {**own, **self.eval_scores(batch, text, prompts[i : i + chunk])}.items():
                scores.setdefault(k, []).append(v)
            rows.append((batch.mask.sum(1).float(), batch.ended.float()))
            responses += text
        length, ended = (torch.cat(x) for x in zip(*rows))
        out = {k: float(torch.cat(v).float().mean()) for k, v in scores.items()}
        out.update({"response_length": float(length.mean()), "ended": float(ended.mean())})
        if self.checker is not None:
            out["checker_accuracy"] = checkers.accuracy(self.checker, [p.text for p in prompts], responses,
                                                        [p.reference for p in prompts])
        return mean_over_ranks(out)
