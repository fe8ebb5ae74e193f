"""Multi-turn episodes against an environment (env=python, align/envs): every episode of a step advances turn by
turn together, one batched generation per turn, finished episodes dropping out.

The tokens: an episode is its opening prompt (the template's rendering of reset()'s messages, with the generation
prompt), then each model turn as sampled (its end-of-turn token included), then the environment's turns as the chat
template renders them after that turn, up to the next generation prompt. Those are exactly the tokens the model
reads on its next turn, and where the model wrote canonical tokens they equal the template's rendering of the final
conversation. Only the model's tokens are trained (Batch.mask); the environment's are context (Batch.present).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from align import envs
from align.data.chat import _turn_end_in, encode_prompt, render
from align.data.prompts import Prompt
from align.models import distributed
from align.rl.rollout import Batch, left_pad, right_pad
from align.rl.turn_cache import TurnCache

# sample(contexts, greedy, max_new_tokens, turns) -> Batch: the loop's sampler (generate() or the vLLM engine); turns:
# the step's TurnCache, naming the episode of each context (generate() reuses the previous turn's KV cache)
Sampler = Callable[[list[list[int]], bool, int, TurnCache], Batch]


@dataclass
class Episode:
    prompt: Prompt
    index: int  # its place in the step's batch
    env: object = None
    messages: list[dict] = field(default_factory=list)
    prompt_ids: list[int] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)  # everything after the prompt: model and environment turns
    mask: list[int] = field(default_factory=list)  # 1 where the model wrote the token
    logp: list[float] = field(default_factory=list)  # the engine's log-probs of the model's tokens (0 elsewhere)
    last_turn: list[int] = field(default_factory=list)  # the model's last turn (its answer)
    turns: int = 0  # model turns
    tool_calls: int = 0  # model turns the environment answered
    reward: float | None = None
    ended: bool = False  # the last model turn ended with a stop token
    finished: bool = False
    error: str | None = None
    info: dict[str, list[float]] = field(default_factory=dict)  # what step() reported in `info`, by name


@dataclass
class Episodes:
    """A step's episodes as the update reads them."""

    batch: Batch  # queries: the opening prompts; responses: the rest; mask: the model's tokens; present: all
    answers: list[str]  # each episode's last model turn, decoded (what a checker or reward function reads)
    rewards: torch.Tensor  # [N] the environment's final reward (0 where it gave none or failed)
    valid: torch.Tensor  # [N] bool: False where the environment failed and data.on_error=skip dropped it
    items: list[Episode]
    env_s: float = 0.0  # wall time in the environment's calls (they run at once: not the sum of each one's)
    reused: float = 0.0  # the share of the turns' context tokens taken from the previous turn's KV cache

    def stats(self) -> dict:
        """A step's episodes summarised (summary()), the time spent in the environment, and the share of context
        tokens the turns after the first did not prefill again (generate(); 0 on vLLM, whose cache is its own)."""
        return {**summary(self.items), "time/env_s": self.env_s, "episode/context_reused": self.reused}


def summary(items: list[Episode]) -> dict:
    """Turns, tool calls and tokens per episode, failed episodes (env/errors), and the mean of each `info` value the
    environment reported (env/<name>)."""
    n = max(len(items), 1)
    out = {"episode/turns": sum(e.turns for e in items) / n,
           "episode/tool_calls": sum(e.tool_calls for e in items) / n,
           "episode/tokens": sum(len(e.ids) for e in items) / n,
           "env/errors": float(sum(e.error is not None for e in items))}
    reported: dict[str, list[float]] = {}
    for e in items:
        for k, values in e.info.items():
            reported.setdefault(k, []).extend(values)
    out.update({f"env/{k}": sum(v) / len(v) for k, v in reported.items()})
    return out


class EpisodeRunner:
    """Runs a step's episodes: the environment class, the tokenizer and the limits, from the stage's config."""

    @classmethod
    def for_stage(cls, cfg, tokenizer, return_logp: bool = False) -> "EpisodeRunner":
        """The runner of a stage that runs episodes (grpo, eval): its env group and its stage.max_turns,
        max_episode_tokens, max_new_tokens and max_prompt_length; data.on_error=skip drops failed episodes."""
        s = cfg.stage
        return cls(cfg.env, tokenizer, max_turns=s.max_turns, max_episode_tokens=s.max_episode_tokens,
                   max_new_tokens=s.max_new_tokens, max_prompt_length=s.max_prompt_length,
                   skip_errors=cfg.data.on_error == "skip", return_logp=return_logp)

    def __init__(self, env_cfg, tokenizer, *, max_turns: int, max_episode_tokens: int, max_new_tokens: int,
                 max_prompt_length: int, skip_errors: bool, return_logp: bool = False):
        self.spec, self.kwargs, self.timeout = env_cfg.cls, dict(env_cfg.kwargs or {}), float(env_cfg.timeout_s)
        self.cls = envs.load_class(env_cfg.cls)
        self.tok = tokenizer
        self.max_turns, self.budget, self.per_turn = max_turns, max_episode_tokens, max_new_tokens
        self.max_prompt = max_prompt_length
        self.skip = skip_errors
        self.pad = tokenizer.pad_token_id
        self.return_logp = return_logp  # an engine other than the trained model samples: keep its log-probs
        self.env_s = 0.0  # wall time in the environment's calls during the last run()

    def run(self, sample: Sampler, prompts: list[Prompt], greedy: bool = False, device=None) -> Episodes:
        episodes = [Episode(p, i) for i, p in enumerate(prompts)]
        self.env_s = 0.0
        self._parallel(episodes, turn=0)
        turns = TurnCache()
        for turn in range(1, self.max_turns + 1):
            active = [e for e in episodes if not e.finished]
            # several ranks may generate in lock-step (ZeRO-3): every rank takes as many turns as the busiest one
            if not distributed.all_reduce_scalar(float(bool(active)), "max"):
                break
            self._model_turn(sample, active or episodes[:1], greedy, write=bool(active), turns=turns)
            self._parallel(active, turn)
        out = self._collect(episodes, device)
        out.reused = turns.reused / max(turns.reused + turns.prefilled, 1)
        return out

    # --- the model's turn ---------------------------------------------------------------------
    def _model_turn(self, sample: Sampler, active: list[Episode], greedy: bool, write: bool,
                    turns: TurnCache) -> None:
        room = [self.budget - len(e.ids) for e in active]
        batch = sample([e.prompt_ids + e.ids for e in active], greedy, max(1, min(self.per_turn, max(room))),
                       turns.rows([e.index for e in active]))
        if not write:  # a rank with nothing left, keeping pace with the others
            return
        for row, (e, left) in enumerate(zip(active, room)):
            n = int(batch.mask[row].sum())
            tokens = batch.responses[row, :n].tolist()
            ended = bool(batch.ended[row]) and n <= left
            tokens = tokens[:left]
            logp = batch.engine_logp[row, : len(tokens)].tolist() if batch.engine_logp is not None else \
                [0.0] * len(tokens)
            e.ids += tokens
            e.mask += [1] * len(tokens)
            e.logp += logp
            e.last_turn, e.ended, e.turns = tokens, ended, e.turns + 1
            content = tokens[:-1] if ended else tokens  # the end-of-turn token is the template's, not content
            e.messages.append({"role": "assistant", "content": self.tok.decode(content, skip_special_tokens=False)})

    # --- the environment's turn ---------------------------------------------------------------
    def _reset(self, e: Episode):
        env = self.cls(**self.kwargs)
        return env, env.reset(e.prompt.row())

    def _opened(self, e: Episode, result) -> None:
        e.env, opening = result
        opening = envs.checked_messages(opening, envs.OPENING_ROLES, "reset()")
        if not opening or opening[-1]["role"] == "assistant":
            raise ValueError("reset() must return the opening turns, the last one not the model's")
        e.messages = opening
        e.prompt_ids = encode_prompt(self.tok, opening)
        if len(e.prompt_ids) >= self.max_prompt:
            raise ValueError(f"reset()'s opening is {len(e.prompt_ids)} tokens, not below stage.max_prompt_length="
                             f"{self.max_prompt}")

    def _step(self, e: Episode):
        return e.env.step([dict(m) for m in e.messages])

    def _answered(self, e: Episode, result, turn: int) -> None:
        turns, e.reward, done, info = envs.checked_step(result)
        for k, v in info.items():
            e.info.setdefault(k, []).append(v)
        if done or not turns or not e.ended or turn == self.max_turns:
            e.finished = True
            return
        delta = self._rendered_after_model_turn(e.messages, turns, turn)
        if len(e.ids) + len(delta) >= self.budget:  # no room left for another model turn
            e.finished = True
            return
        e.messages += turns
        e.ids += delta
        e.mask += [0] * len(delta)
        e.logp += [0.0] * len(delta)
        e.tool_calls += 1

    def _rendered_after_model_turn(self, messages: list[dict], turns: list[dict], turn: int) -> list[int]:
        """The tokens the chat template writes after the model's last turn (its end-of-turn token excluded): the
        environment's turns and the next generation prompt."""
        before = render(self.tok, messages[:-1], add_generation_prompt=True)
        upto = render(self.tok, messages)
        cut = _turn_end_in(self.tok, upto, len(before), len(upto))
        after = render(self.tok, messages + turns, add_generation_prompt=True)
        if not (upto.startswith(before) and after.startswith(upto[:cut])):
            raise ValueError(f"the chat template does not render the conversation as a growing prefix after model "
                             f"turn {turn} (it rewrites earlier turns), so the episode's tokens cannot be the ones the "
                             "model reads next; use a template that renders earlier turns unchanged")
        return self.tok(after[cut:], add_special_tokens=False)["input_ids"]

    def _parallel(self, episodes: list[Episode], turn: int) -> None:
        """The environment's reset (turn 0) or step for every episode at once, each call in its own thread, all within
        env.timeout_s; what they return is applied here, in order. A failure (an exception, the timeout, a value
        align cannot use) either stops the run naming the env, row and turn, or (data.on_error=skip) ends that
        episode and is counted."""
        if not episodes:
            return
        results: dict[int, tuple] = {}
        call = self._reset if turn == 0 else self._step

        def target(e: Episode):
            try:
                results[e.index] = (True, call(e))
            except BaseException as exc:  # noqa: BLE001 - the user's environment: reported with its row and turn
                results[e.index] = (False, exc)

        threads = [threading.Thread(target=target, args=(e,), daemon=True) for e in episodes]
        start = time.monotonic()
        deadline = start + self.timeout
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self.env_s += time.monotonic() - start
        for t, e in zip(threads, episodes):
            done = results.get(e.index) if not t.is_alive() else None  # a hung call's thread is left behind
            if done is None:
                self._failed(e, f"no answer within env.timeout_s={self.timeout:g} s", turn)
            elif not done[0]:
                self._failed(e, f"raised {type(done[1]).__name__}: {done[1]}", turn, done[1])
            else:
                try:
                    self._opened(e, done[1]) if turn == 0 else self._answered(e, done[1], turn)
                except ValueError as exc:  # what it returned cannot be used
                    self._failed(e, str(exc), turn, exc)

    def _failed(self, e: Episode, problem: str, turn: int, cause: BaseException | None = None) -> None:
        where = e.prompt.where or f"prompt {e.prompt.text!r}"
        message = f"env {self.spec}, {where}, {'reset()' if turn == 0 else f'turn {turn}'}: {problem}"
        if not self.skip:
            raise envs.EnvError(f"{message}. Fix the environment, or set data.on_error=skip to drop such episodes "
                                "(counted as env/errors)") from cause
        e.error, e.finished, e.reward = message, True, None

    # --- the batch ----------------------------------------------------------------------------
    def _collect(self, episodes: list[Episode], device) -> Episodes:
        for e in episodes:
            if not e.prompt_ids:  # reset() failed: the data's prompt stands in, nothing trains
                e.prompt_ids = list(e.prompt.ids)
        queries, query_mask = left_pad([e.prompt_ids for e in episodes], self.pad, device)
        rest = [e.ids or [self.pad] for e in episodes]
        responses, present = right_pad(rest, self.pad)
        mask = right_pad([e.mask or [0] for e in episodes], 0)[0]
        present = present * torch.tensor([bool(e.ids) for e in episodes], dtype=present.dtype)[:, None]
        logp = torch.zeros(responses.shape, dtype=torch.float32)
        for row, e in enumerate(episodes):
            logp[row, : len(e.logp)] = torch.tensor(e.logp, dtype=torch.float32)
        ended = torch.tensor([e.ended for e in episodes])
        batch = Batch(queries, query_mask, responses.to(queries.device), mask.to(queries.device),
                      ended.to(queries.device), logp.to(queries.device) if self.return_logp else None,
                      present.to(queries.device))
        answers = [self.tok.decode(e.last_turn, skip_special_tokens=True) for e in episodes]
        rewards = torch.tensor([e.reward if e.reward is not None and e.error is None else 0.0 for e in episodes])
        valid = torch.tensor([e.error is None for e in episodes])
        return Episodes(batch, answers, rewards, valid, episodes, self.env_s)
