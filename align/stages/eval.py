"""stage=eval: what each stage did, in numbers, on held-out data. Trains nothing.

For every policy — the run's outputs of every stage whose StageSpec says policy=True, or `stage.policies`
(stage names or model paths) — on the eval split (`data.eval`, the demo's eval split, or `data.eval_fraction`):

  perplexity        exp(mean NLL of the answer tokens) over the eval rows that have an answer
  checker_accuracy  the task checker (`data.checker`) on greedy answers to `stage.prompts` prompts
  reward_mean       the judge's raw score of those greedy answers (judge: the run's rm, `stage.reward`)
  win_rate          share of prompts whose greedy answer the judge scores above the baseline's (ties: half)
  kl                KL(policy || baseline) per response, estimated on `stage.kl_samples` sampled answers

With an environment (env=python), each greedy answer is a whole episode against it (align/rl/episodes.py): the
checker reads its last model turn, and the environment's reward (env_reward), turns and tool calls per episode and
the mean of each `info` value it reports (env/<name>) are added.

and for the judge its pair accuracy on held-out preference pairs (`rm_accuracy`). Results go to
stage.json (`<policy>/<metric>`) and results.md. Every rank computes the same numbers; rank 0 writes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from align import envs
from align.config.registry import Footprint, Held, StageSpec
from align.config.registry import policies as registry_policies
from align.config.schema import AT_LEAST_ONE, NON_NEGATIVE, StageConfig, keyed
from align.data.loader import eval_pairs, eval_prompts
from align.data.prompts import prompt_records
from align.models.loading import load_pretrained, load_reward_model, load_tokenizer, resolve_name
from align.models.metrics import IGNORE_INDEX, labelled_nll, pair_accuracy, perplexity, sequence_kl, win_rate
from align.rl import rollout
from align.rl.engine import device
from align.rl.episodes import EpisodeRunner, summary
from align.rl.logprobs import causal_lm_parts, token_logprobs
from align.run import handoff, tracking
from align.run.stage_run import StageResult, StageRun
from align.stages.common import numeric_metrics, print_summary
from align.tasks import checkers

log = logging.getLogger("align")


@dataclass
class EvalStageConfig(StageConfig):
    name: str = "eval"
    policies: list[str] = keyed(None, help="run stages or model paths; []: every policy stage the run has",
                                factory=list)
    baseline: str | None = keyed("sft", help="win-rate and KL are measured against it: the run's sft, a path, or null")
    reward: str | None = keyed(None, help="judge: the run's rm, a path, or `none`")
    pairs: str | None = keyed(None, help="preference pairs for the judge's accuracy; default: its own held-out pairs")
    prompts: int = keyed(256, NON_NEGATIVE, "held-out prompts each policy answers (greedy; 0: all)")
    max_prompt_length: int = keyed(512, AT_LEAST_ONE, "longest prompt in tokens")
    max_new_tokens: int = keyed(64, AT_LEAST_ONE, "longest answer in tokens")
    kl_samples: int = keyed(1, AT_LEAST_ONE, "sampled responses per prompt for the KL estimate")
    batch_size: int = keyed(64, AT_LEAST_ONE, "prompts per forward/generate call")
    max_turns: int = keyed(4, AT_LEAST_ONE, "env=python: the most model turns of one episode")
    max_episode_tokens: int = keyed(256, AT_LEAST_ONE, "env=python: the most tokens after the prompt in one episode")

COLUMNS = ("checker_accuracy", "env_reward", "episode/turns", "episode/tool_calls", "reward_mean", "win_rate", "kl",
           "perplexity")
NO_ADAPTER = OmegaConf.create({"method": "none"})


def run(cfg: DictConfig) -> StageResult:
    s = cfg.stage
    stage = StageRun(cfg)
    policies = _policies(cfg)
    baseline = handoff.find_parent(cfg, "sft", None if s.baseline == "sft" else s.baseline) if s.baseline else None
    judge = None if s.reward == "none" else handoff.find_parent(cfg, "rm", s.reward)
    tokenizer = load_tokenizer(resolve_name(str(policies[0][1].model)), cfg.model)
    rows, report = eval_prompts(cfg.data, tokenizer, s.max_prompt_length, cfg.train.max_length, cfg.train.seed)
    if not rows:
        raise ValueError("eval: no held-out rows to evaluate on; set data.eval=FILE or data.eval_fraction "
                         f"({report.errors.summary()})")
    asked = rows[: s.prompts] if s.prompts else rows
    checker = checkers.from_config(cfg.data)
    ev = Evaluator(cfg, tokenizer)
    stage.start_logging()

    judge_model = ev.load(judge, classifier=True) if judge else None
    base_model = ev.load(baseline) if baseline else None
    base_scores = None
    if judge_model is not None and base_model is not None:
        base_scores = ev.scores(judge_model, ev.answer(base_model, asked, greedy=True)[0])

    results: dict[str, dict] = {}
    for label, parent in policies:
        log.info("eval: %s (%s)", label, parent.model)
        model = ev.load(parent)
        r = {"perplexity": ev.perplexity(model, rows)}
        batches, texts, episode_metrics = ev.answer(model, asked, greedy=True)
        r.update(episode_metrics)
        if checker is not None:
            r["checker_accuracy"] = checkers.accuracy(checker, [x["prompt_text"] for x in asked], texts,
                                                      [x["reference"] for x in asked])
        if judge_model is not None:
            scores = ev.scores(judge_model, batches)
            r["reward_mean"] = float(scores.mean())
            if base_scores is not None:
                r["win_rate"] = win_rate(scores, base_scores)
        if base_model is not None:
            r["kl"] = ev.kl(model, base_model, asked, s.kl_samples)
        results[label] = r
        del model

    metrics = {f"{label}/{k}": v for label, r in results.items() for k, v in r.items()}
    pairs_data = _pairs_data(cfg, judge) if judge_model is not None else None
    if pairs_data is not None:
        pairs, _ = eval_pairs(pairs_data, tokenizer, cfg.train.max_length, cfg.train.seed)
        if pairs:
            metrics["rm_accuracy"] = ev.pair_accuracy(judge_model, pairs)
    metrics.update({"eval/prompts": len(asked), "eval/rows": len(rows)})
    metrics = numeric_metrics(metrics)
    parents = [p for _, p in policies] + [p for p in (baseline, judge) if p is not None]
    if tracking.is_main_process():
        table = results_table(results, baseline, judge, metrics.get("rm_accuracy"))
        stage.commit(None, _unique(parents), str(policies[0][1].info.get("base_model", policies[0][1].model)),
                     metrics, task="eval", extra={"policies": [label for label, _ in policies]},
                     extra_files={handoff.RESULTS_MD: table})
        print_summary("eval", metrics, stage.out)
    return StageResult(stage.out, metrics)


def _policies(cfg: DictConfig) -> list[tuple[str, handoff.Parent]]:
    """(label, parent) of each policy: the named stages / paths, or every policy stage the run completed."""
    named = list(cfg.stage.policies)
    if not named:
        found = [(name, handoff.find_parent(cfg, name)) for name in registry_policies()]
        found = [(name, p) for name, p in found if p is not None]
        if not found:
            raise handoff.HandoffError(
                f"eval: run {cfg.run.name!r} has no completed policy stage ({', '.join(registry_policies())}) to "
                f"evaluate; train one first "
                "or name models with stage.policies=[PATH,...]")
        return found
    out = []
    for item in named:
        if item in registry_policies():
            parent = handoff.find_parent(cfg, item)
            if parent is None:
                raise handoff.HandoffError(f"eval: stage.policies names {item}, but run {cfg.run.name!r} has no "
                                           f"{item} output (runs/{cfg.run.name}/{item}/stage.json)")
            out.append((item, parent))
        else:
            out.append((Path(item).name or item, handoff.find_parent(cfg, "policy", item)))
    return out


def _pairs_data(cfg: DictConfig, judge: handoff.Parent):
    """The data config whose held-out split holds the judge's test pairs: `stage.pairs`, else the data the
    judge was trained on (its config.yaml); None when neither is known."""
    if cfg.stage.pairs:
        data = OmegaConf.to_container(cfg.data)
        data.update(eval=cfg.stage.pairs, eval_fraction=0.0)
        return OmegaConf.create(data)
    recorded = judge.path / handoff.CONFIG_YAML
    if recorded.is_file():
        return OmegaConf.load(recorded).data
    return None


def _unique(parents: list[handoff.Parent]) -> list[handoff.Parent]:
    seen, out = set(), []
    for p in parents:
        if p.identity not in seen:
            seen.add(p.identity)
            out.append(p)
    return out


class Evaluator:
    """The model calls of the eval stage, batched, on this rank's device."""

    def __init__(self, cfg: DictConfig, tokenizer):
        self.cfg, self.s, self.dev, self.tok = cfg, cfg.stage, device(), tokenizer
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.stop_ids = rollout.stop_token_ids(tokenizer, [])
        self.episodes = None  # env=python: every answer is an episode against the environment
        if envs.selected(cfg):
            self.episodes = EpisodeRunner.for_stage(cfg, tokenizer)

    def load(self, parent: handoff.Parent, classifier: bool = False):
        """A policy (causal LM), or with `classifier` a judge; adapters merged into their base."""
        from transformers import AutoModelForCausalLM

        if classifier:
            model = load_reward_model(str(parent.model), self.cfg.model, NO_ADAPTER, self.pad)
        else:
            model = load_pretrained(AutoModelForCausalLM, str(parent.model), self.cfg.model, NO_ADAPTER)
        return model.to(self.dev).eval()

    def _chunks(self, items: list):
        step = max(1, self.s.batch_size)
        return [items[i : i + step] for i in range(0, len(items), step)]

    @torch.no_grad()
    def answer(self, model, rows: list[dict], greedy: bool) -> tuple[list[rollout.Batch], list[str], dict]:
        """An answer (with an environment: an episode) to each row's prompt, by chunks of stage.batch_size: the
        batches, each answer's text (an episode's: its last model turn) and, with an environment, the episodes
        summarised."""
        def sample(prompts: list[list[int]], greedy: bool, max_new_tokens: int, turns=None) -> rollout.Batch:
            return rollout.generate(model, prompts, pad_id=self.pad, stop_ids=self.stop_ids,
                                    max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0, greedy=greedy,
                                    device=self.dev, turns=turns)

        if self.episodes is None:
            batches = [sample([r["prompt_ids"] for r in chunk], greedy, self.s.max_new_tokens)
                       for chunk in self._chunks(rows)]
            return batches, [t for b in batches for t in rollout.decode_responses(self.tok, b)], {}
        runs = [self.episodes.run(sample, prompt_records(chunk), greedy, device=self.dev)
                for chunk in self._chunks(rows)]
        rewards = torch.cat([run.rewards for run in runs])
        summarised = {"env_reward": float(rewards.mean()), **summary([e for run in runs for e in run.items])}
        return [run.batch for run in runs], [t for run in runs for t in run.answers], summarised

    @torch.no_grad()
    def scores(self, judge, batches: list[rollout.Batch]) -> torch.Tensor:
        return torch.cat([rollout.sequence_scores(judge, b).cpu() for b in batches])

    @torch.no_grad()
    def kl(self, model, reference, rows: list[dict], samples: int) -> float:
        torch.manual_seed(self.cfg.train.seed)  # the same sampled answers whenever the stage runs
        per_response = []
        for _ in range(max(1, samples)):
            for batch in self.answer(model, rows, greedy=False)[0]:
                logp, _ = rollout.response_logprobs(model, batch)
                ref, _ = rollout.response_logprobs(reference, batch)
                per_response.append(sequence_kl(logp, ref, batch.mask).cpu())
        return float(torch.cat(per_response).mean())

    @torch.no_grad()
    def perplexity(self, model, rows: list[dict]) -> float:
        scored = [r for r in rows if r["labels"]]
        total, count = 0.0, 0
        backbone, head, transform = causal_lm_parts(model)
        for chunk in self._chunks(scored):
            ids, attn = rollout.right_pad([r["input_ids"] for r in chunk], self.pad)
            labels, _ = rollout.right_pad([r["labels"] for r in chunk], IGNORE_INDEX)
            hidden = backbone(input_ids=ids.to(self.dev), attention_mask=attn.to(self.dev), use_cache=False).last_hidden_state
            picked, _ = token_logprobs(hidden[:, :-1], labels[:, 1:].clamp(min=0).to(self.dev), head, transform)
            nll, n = labelled_nll(picked.cpu(), labels)
            total, count = total + nll, count + n
        return perplexity(total, count)

    def pair_accuracy(self, judge, pairs: list[dict]) -> float:
        chosen = rollout.score(judge, [p["chosen_ids"] for p in pairs], self.pad, self.s.batch_size)
        rejected = rollout.score(judge, [p["rejected_ids"] for p in pairs], self.pad, self.s.batch_size)
        return pair_accuracy(chosen, rejected)


def results_table(results: dict[str, dict], baseline, judge, rm_accuracy) -> str:
    """results.md: one row per policy, the columns that were measured."""
    cols = [c for c in COLUMNS if any(c in r for r in results.values())]
    lines = ["| policy | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for label, r in results.items():
        lines.append(f"| {label} | " + " | ".join(f"{r[c]:.3f}" if c in r else "" for c in cols) + " |")
    notes = []
    if baseline is not None:
        notes.append(f"win_rate and kl are against the baseline {baseline.path}")
    if judge is not None:
        notes.append(f"judge: {judge.path}" + (f" (pair accuracy {rm_accuracy:.3f})" if rm_accuracy is not None else ""))
    return "\n".join(lines) + "\n\n" + "".join(f"- {n}\n" for n in notes)


def _parents(cfg) -> list[tuple[str, str | None]]:
    """The policies (default: the policy stages the run has), the baseline and the judge."""
    s, policies = cfg.stage, registry_policies()
    named = list(s.policies) or list(policies)
    specs = [(p, None) if p in policies else ("policy", p) for p in named]
    specs += [("sft", None if s.baseline == "sft" else s.baseline)] if s.baseline else []
    return specs + ([] if s.reward == "none" else [("rm", s.reward)])


def footprint(cfg) -> Footprint:
    """One policy at a time answering stage.batch_size prompts, and the run's reward model judging; nothing trains."""
    s = cfg.stage
    return Footprint((Held("policy"), Held("reward model", score_head=True)), rollout_sequences=s.batch_size,
                     rollout_tokens=s.max_prompt_length + s.max_new_tokens, chunked_logits=True, train_tokens=0)


SPEC = StageSpec(
    name="eval", footprint=footprint, schema=EvalStageConfig, run=run, parents=_parents, trains=False, reads_env=True,
    headline=("sft/checker_accuracy", "dpo/checker_accuracy", "ppo/checker_accuracy", "grpo/checker_accuracy",
              "dpo/win_rate", "ppo/win_rate", "grpo/win_rate", "dpo/kl", "ppo/kl", "grpo/kl", "rm_accuracy"))
