"""stage=iterative_dpo: DPO in rounds on pairs the policy samples itself and a judge ranks (Llama 3's post-training
ran DPO in rounds like this; so do Self-Rewarding LMs and iterative/online DPO).

Each of `stage.rounds` rounds: `stage.prompts_per_round` prompts (fresh ones each round while the data has them)
are each answered `stage.samples_per_prompt` times by the current policy (rollout.generate, the online stages'
sampler) -> every answer scored by the reward group (reward=checker by default: the data's task checker; rm: the
run's reward model; python: a function) -> one pair per prompt, its best answer against its worst; prompts whose
answers all score the same are left out (counted) -> the pairs written to `pairs/round-N.jsonl` -> DPO on them
with the dpo stage's trainer and losses (stage.loss_type, stage.beta, ...), the round's starting policy as the
reference (with LoRA: the same weights, adapter off) -> the next round starts from the round's model.

Work in progress lives in rounds/<config hash>/round-N/ of the output folder (the pairs, then the round's model);
an interrupted run resumes at the round it was in: a round's pairs are never sampled twice, and its DPO resumes
from its last checkpoint. The output's model/ is the last round's; with LoRA it is an adapter on the previous
round's (kept under rounds/), which is one on the one before, down to the SFT output: align's loader merges the
chain. Sampling holds the whole policy on each rank, also under ZeRO-3 (no optimizer state exists then).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig

from align import rewards
from align.config.registry import Footprint, Held, StageSpec
from align.config.schema import AT_LEAST_ONE, Check, keyed
from align.data.loader import prompt_datasets
from align.data.prompts import Prompt, prompt_records
from align.models import distributed
from align.models.loading import (
    cast_trainable,
    load_pretrained,
    load_tokenizer,
    point_adapter_at,
    resolve_name,
    set_use_cache,
    whole_weights,
)
from align.rl import rollout
from align.rl.judged_pairs import best_and_worst
from align.rl.loop import reward_model_scores
from align.rl.reference_free import REFERENCE_FREE
from align.run import handoff, tracking
from align.run.stage_run import StageResult, StageRun
from align.stages import dpo, online
from align.stages.common import (
    max_length,
    numeric_metrics,
    policy_and_reference,
    preference_metrics,
    print_summary,
    start_from,
    trainer_metrics,
)

log = logging.getLogger("align")
ROUNDS_DIR = "rounds"
PAIRS_DIR = "pairs"
ROUND_MARKER = ".round"  # in checkpoints/: the round its checkpoints belong to


@dataclass
class IterativeDPOStageConfig(dpo.DPOStageConfig):
    name: str = "iterative_dpo"
    rounds: int = keyed(2, AT_LEAST_ONE, "rounds of sample -> judge -> DPO, each from the previous round's model")
    samples_per_prompt: int = keyed(4, Check(low=2), "answers sampled per prompt; its best and worst form the pair")
    prompts_per_round: int | None = keyed(None, AT_LEAST_ONE, "prompts sampled each round (fresh ones while the data "
                                                              "has them); null: every training prompt")
    sample_batch_size: int = keyed(64, AT_LEAST_ONE, "prompts per generate call (x samples_per_prompt answers)")
    max_prompt_length: int = keyed(512, AT_LEAST_ONE, "longest prompt in tokens")
    max_new_tokens: int = keyed(64, AT_LEAST_ONE, "longest sampled answer in tokens")
    temperature: float = keyed(1.0, Check(0, None, low_open=True), "sampling temperature")
    top_p: float = keyed(1.0, Check(0, 1, low_open=True), "nucleus sampling")
    stop_tokens: list[str] = keyed(None, help="extra single-token stops besides EOS", factory=list)


@dataclass
class Judged:
    """One round's pairs (every rank's, in prompt order) and what the judge saw."""

    pairs: list[dict]  # {prompt_ids, chosen_ids, rejected_ids} and, for the file, texts and scores
    answers: int
    reward_mean: float
    tied: int  # prompts left out: all their answers scored the same (or fewer than two were judged)


@dataclass
class Rounds:
    """What the finished rounds leave for the commit."""

    summaries: list[dict] = field(default_factory=list)  # per round: pairs, sampled reward, ties, losses
    history: list[dict] = field(default_factory=list)  # each trained round's DPO log
    pair_files: dict[int, Path] = field(default_factory=dict)
    warnings: list[dict] = field(default_factory=list)
    trained: dict = field(default_factory=dict)  # the last trained round's DPO metrics
    model: object = None  # the last trained round's model, when this process trained it

    def add(self, folder: Path) -> None:
        """A round finished before (by this process or an interrupted one), from its folder."""
        record = json.loads((folder / "round.json").read_text())
        self.trained = record.pop("metrics")
        self.summaries.append(record)
        self.history.extend(handoff.read_history(folder))


def run(cfg: DictConfig) -> StageResult:
    s = cfg.stage
    names = dpo.loss_types(s)
    stage = StageRun(cfg)
    parent, source = start_from(cfg, "sft", s.init)
    rm_parent = online.reward_model_parent(cfg, "checker")
    judge = rewards.build(cfg.reward, cfg.data, rm_score=(lambda b: None) if rm_parent else None, auto="checker")
    tokenizer = load_tokenizer(resolve_name(source), cfg.model)
    train_ds, _, report = prompt_datasets(cfg.data, tokenizer, s.max_prompt_length, cfg.train.seed)
    prompts = prompt_records(train_ds)
    log.info("prompts: %d; %s", len(prompts), report.errors.summary())

    work, done = _work_folder(stage), Rounds()
    done.warnings.extend(rewards.at_chance(rm_parent, "iterative_dpo"))
    stage.start_logging()
    for r in range(1, s.rounds + 1):
        folder = work / f"round-{r}"
        done.pair_files[r] = folder / "pairs.jsonl"
        if (folder / handoff.MODEL_DIR).is_dir():
            log.info("round %d: done before (%s)", r, folder)
            source = str(folder / handoff.MODEL_DIR)
            done.add(folder)
            continue
        judged = _pairs_of_round(cfg, folder, r, source, _round_prompts(prompts, r, s, cfg.train.seed), tokenizer,
                                 judge, rm_parent)
        if not judged.pairs and r > 1:  # the policy answers every prompt alike: nothing left to prefer
            log.warning("round %d: no pairs (every prompt's %d answers scored the same; sampled reward %.3f): the "
                        "rounds end here, the output is round %d's model", r, s.samples_per_prompt,
                        judged.reward_mean, r - 1)
            done.summaries.append({"round": r, "pairs": 0, "answers": judged.answers,
                                   "sampled_reward_mean": judged.reward_mean, "tied_prompts": judged.tied})
            break
        done.model = None  # the previous round's model is not held while this one trains
        trainer, result, watch = _train_round(cfg, stage, r, source, judged.pairs, tokenizer, names)
        trained = {**trainer_metrics(stage, trainer, result), **watch.metrics(),
                   **preference_metrics(trainer, dpo.METRICS, evaluate=False)}
        summary = {"round": r, "pairs": len(judged.pairs), "answers": judged.answers,
                   "sampled_reward_mean": judged.reward_mean, "tied_prompts": judged.tied,
                   **{k: trained[k] for k in ("first_loss", "last_loss", "global_step") if k in trained}}
        done.warnings.extend({"round": r, **w} for w in watch.warnings)
        offset = sum(x.get("global_step", 0) for x in done.summaries)  # one step axis across rounds (plots)
        history = [{**h, "round": r, "round_step": h.get("step"), "step": offset + h.get("step", 0)}
                   for h in trainer.state.log_history]
        source = _save_round(trainer, tokenizer, folder, source, {**summary, "metrics": trained}, history)
        done.add(folder)
        done.model = trainer.model
        del trainer
    metrics = _metrics(done, dpo.resolved_beta(s, names), report)
    return _commit(stage, tokenizer, [p for p in (parent, rm_parent) if p], Path(source), metrics, done, work)


def _metrics(done: Rounds, beta: float, report) -> dict:
    """The last trained round's DPO metrics, each round's pairs and sampled reward (round_N/...; last_round/... the
    same as the last N), beta, the data report."""
    out = {**done.trained, "beta": beta}
    for summary in done.summaries:
        for prefix in (f"round_{summary['round']}", *(["last_round"] if summary is done.summaries[-1] else [])):
            out.update({f"{prefix}/{k}": summary[k] for k in ("pairs", "sampled_reward_mean", "tied_prompts")})
    out["rounds"] = sum(1 for summary in done.summaries if summary["pairs"])
    out.update(report.metrics())
    return numeric_metrics(out)


def _work_folder(stage: StageRun) -> Path:
    """rounds/<config hash>/ of the output: this config's rounds (kept when resuming; emptied with run.force or
    run.resume=false). Other configs' folders stay until this run commits: an earlier complete output's adapter
    chain points into its own."""
    work = stage.out / ROUNDS_DIR / stage.config_hash[:16]
    if tracking.is_main_process():
        if stage.cfg.run.force or not stage.cfg.run.resume:
            shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    return work


def _round_prompts(prompts: list[Prompt], r: int, s, seed: int) -> list[Prompt]:
    """Round r's prompts: stage.prompts_per_round of them, in one seeded order, each round the next ones (wrapping
    around when the data runs out); every prompt with prompts_per_round=null."""
    n = s.prompts_per_round or len(prompts)
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed)).tolist()
    start = ((r - 1) * n) % len(prompts)
    return [prompts[order[(start + i) % len(prompts)]] for i in range(min(n, len(prompts)))]


def _pairs_of_round(cfg, folder: Path, r: int, source: str, prompts: list[Prompt], tokenizer,
                    judge, rm_parent) -> Judged:
    """The round's pairs: read back when an interrupted run sampled them already, else sampled from the policy at
    `source` (each rank its share of the prompts), judged, gathered and written (main process, atomically)."""
    path = folder / "pairs.jsonl"
    if not path.is_file():
        # seeded per round and rank: a run interrupted while sampling samples the same answers when it resumes
        torch.manual_seed(cfg.train.seed + 7919 * r + distributed.rank())
        mine = _sample_and_judge(cfg, source, prompts[distributed.rank()::distributed.world_size()], tokenizer, judge,
                                 rm_parent)
        parts = _gather(mine)
        pairs = [p for part in parts for p in part.pairs]  # rank order: the same list on every rank
        answers = sum(p.answers for p in parts)
        judged = Judged(pairs, answers, sum(p.reward_mean * p.answers for p in parts) / max(answers, 1),
                        sum(p.tied for p in parts))
        if tracking.is_main_process():
            folder.mkdir(parents=True, exist_ok=True)
            handoff.atomic_write_text(path, "".join(json.dumps(p) + "\n" for p in pairs))
            judge_record = {"answers": answers, "reward_mean": judged.reward_mean, "tied": judged.tied}
            handoff.atomic_write_text(folder / "judge.json", json.dumps(judge_record))
        distributed.barrier()
        log.info("round %d: %d pairs from %d prompts x %d answers (sampled reward %.3f; %d prompts tied)", r,
                 len(pairs), len(prompts), cfg.stage.samples_per_prompt, judged.reward_mean, judged.tied)
        return judged
    pairs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    info = json.loads((folder / "judge.json").read_text())
    log.info("round %d: %d pairs sampled before (%s)", r, len(pairs), path)
    return Judged(pairs, info["answers"], info["reward_mean"], info["tied"])


def _gather(mine: Judged) -> list[Judged]:
    if not distributed.is_initialized() or distributed.world_size() == 1:
        return [mine]
    import torch.distributed as dist

    out = [None] * distributed.world_size()
    dist.all_gather_object(out, mine)
    return out


def _sample_and_judge(cfg, source: str, prompts: list[Prompt], tokenizer, judge, rm_parent) -> Judged:
    """This rank's prompts answered stage.samples_per_prompt times each by the whole policy (loaded whole, also
    under ZeRO-3, where no optimizer state exists yet, and dropped before training), scored by the judge."""
    s, K = cfg.stage, cfg.stage.samples_per_prompt
    policy, rm = _judging_models(cfg, source, rm_parent, tokenizer)
    if rm is not None:
        judge.bind_rm(lambda b: reward_model_scores(rm, b).cpu())
    stops = rollout.stop_token_ids(tokenizer, list(s.stop_tokens))
    pairs, total, answers, tied = [], 0.0, 0, 0
    for at in range(0, len(prompts), s.sample_batch_size):
        chunk = prompts[at: at + s.sample_batch_size]
        items = [p for p in chunk for _ in range(K)]
        batch = rollout.generate(policy, [p.ids for p in items], pad_id=tokenizer.pad_token_id, stop_ids=stops,
                                 max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p).to("cpu")
        texts = rollout.decode_responses(tokenizer, batch)
        scored = judge(batch, texts, items)
        total, answers = total + float(scored.total[scored.valid].sum()), answers + int(scored.valid.sum())
        best, worst, keep = best_and_worst(scored.total.view(-1, K), scored.valid.view(-1, K))
        tied += int((~keep).sum())
        pairs += [_pair(p, batch, texts, scored.total, i * K + int(best[i]), i * K + int(worst[i]))
                  for i, p in enumerate(chunk) if keep[i]]
    judge.bind_rm(lambda b: None)  # the reward model is freed with this function's frame, not kept by the judge
    return Judged(pairs, answers, total / max(answers, 1), tied)


def _judging_models(cfg, source: str, rm_parent, tokenizer):
    """(policy, reward model or None) for sampling and judging: whole on this rank, frozen, in eval mode."""
    from transformers import AutoModelForCausalLM

    with whole_weights():
        policy = load_pretrained(AutoModelForCausalLM, source, cfg.model, cfg.peft)
        rm = online.load_reward_model(cfg, None, rm_parent, tokenizer.pad_token_id) if rm_parent else None
    if cfg.peft.method != "qlora":  # bitsandbytes placed the 4-bit weights as it loaded them
        policy = policy.to(distributed.device())
    policy.requires_grad_(False)
    set_use_cache(policy, True)
    return policy.eval(), rm


def _pair(p: Prompt, batch: rollout.Batch, texts: list[str], scores: torch.Tensor, c: int, w: int) -> dict:
    """One pair: the token ids DPO trains on (the prompt's and each answer's as sampled, up to and including the
    stop token), and for the reader the texts, the scores and the data row."""
    def ids(row: int) -> list[int]:
        return batch.responses[row][batch.mask[row].bool()].tolist()

    return {"where": p.where, "prompt": p.text, "chosen": texts[c], "rejected": texts[w],
            "chosen_score": round(float(scores[c]), 6), "rejected_score": round(float(scores[w]), 6),
            "prompt_ids": list(p.ids), "chosen_ids": ids(c), "rejected_ids": ids(w)}


def _train_round(cfg, stage: StageRun, r: int, source: str, pairs: list[dict], tokenizer, names: list[str]):
    """DPO on the round's pairs from `source` (the reference: `source` as it is), resumed from this round's last
    checkpoint when an interrupted run left one. Returns (trainer, train result, displacement watch)."""
    from datasets import Dataset

    if not pairs:
        raise rewards.RewardError(f"iterative_dpo round {r}: no pairs: every prompt's {cfg.stage.samples_per_prompt} "
                                  "answers scored the same. Sample more answers per prompt (stage.samples_per_prompt), "
                                  "raise stage.temperature, or check the reward (reward=...) on a few answers")
    free = any(n in REFERENCE_FREE for n in names)
    _checkpoints_for_round(stage, r)
    length = max_length(cfg, tokenizer)
    rows = Dataset.from_list([_cut(p, length) for p in pairs])
    if cfg.stage.precompute_ref_logps and not free:
        (rows,) = stage.shared_datasets(rows)
    args = dpo.trainer_arguments(cfg, stage, names, length, has_eval=False)
    model, ref_model, peft_config = policy_and_reference(cfg, source, reference=not free)
    trainer = dpo.build_trainer(free, cfg.stage.simpo_gamma, model=model, ref_model=ref_model, args=args,
                                train_dataset=rows, processing_class=tokenizer, peft_config=peft_config)
    if cfg.peft.method == "qlora":
        cast_trainable(trainer.model)
    from align.stages.displacement import DisplacementWatch

    watch = DisplacementWatch(args.beta, cfg.stage.displacement_bound, reference=not free)
    trainer.add_callback(watch)
    log.info("round %d: DPO on %d pairs from %s", r, len(rows), source)
    return trainer, stage.train(trainer), watch


def _cut(pair: dict, length: int) -> dict:
    """The ids DPO reads, each answer cut so prompt + answer fits train.max_length."""
    room = max(length - len(pair["prompt_ids"]), 1)
    return {"prompt_ids": pair["prompt_ids"], "chosen_ids": pair["chosen_ids"][:room],
            "rejected_ids": pair["rejected_ids"][:room]}


def _checkpoints_for_round(stage: StageRun, r: int) -> None:
    """checkpoints/ for round r: its own checkpoints resumed (an interrupted run's, same config), anything else
    (another round's) cleared."""
    marker = stage.checkpoints / ROUND_MARKER
    if not (marker.is_file() and marker.read_text().strip() == str(r)):
        stage.start_over = True
    stage.resume_from = None
    stage.prepare_checkpoints()
    if tracking.is_main_process():
        marker.write_text(f"{r}\n")
    distributed.barrier()


def _save_round(trainer, tokenizer, folder: Path, source: str, record: dict, history: list[dict]) -> str:
    """The round's model written to round-N/model/ (every rank takes part: ZeRO-3 gathers), an adapter pointing at
    the model the round started from, with its record (round.json) and DPO log; the model folder appears last and
    whole (it marks the round done). Returns its path: the next round's start."""
    final, staged = folder / handoff.MODEL_DIR, folder / f".{handoff.MODEL_DIR}.new"
    point_adapter_at(trainer.model, source)
    set_use_cache(trainer.model, True)
    if trainer.is_world_process_zero():
        shutil.rmtree(staged, ignore_errors=True)
    distributed.barrier()
    trainer.save_model(str(staged))
    if trainer.is_world_process_zero():
        (staged / "training_args.bin").unlink(missing_ok=True)
        tokenizer.save_pretrained(staged)
        handoff.atomic_write_text(folder / handoff.HISTORY, "".join(json.dumps(h, default=str) + "\n" for h in history))
        handoff.atomic_write_text(folder / "round.json", json.dumps(record))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staged, final)
    distributed.barrier()
    return str(final)


def _commit(stage: StageRun, tokenizer, parents: list, model_dir: Path, metrics: dict, done: Rounds,
            work: Path) -> StageResult:
    """The last trained round's model as the output's model/ (with LoRA an adapter on the previous round's, copied:
    the rounds stay where the chain points; with full weights moved), each round's pairs in pairs/round-N.jsonl, the
    rounds in stage.json; then the other configs' rounds removed, and with full weights the rounds' models."""
    adapters = stage.cfg.peft.method != "none"
    if tracking.is_main_process():
        staged = handoff.staged_path(stage.out)
        shutil.rmtree(staged, ignore_errors=True)
        if adapters:
            shutil.copytree(model_dir, staged)
        else:
            os.replace(model_dir, staged)
        pairs = handoff.staging_dir(stage.out, PAIRS_DIR)
        for r, path in done.pair_files.items():
            if path.is_file():
                shutil.copyfile(path, pairs / f"round-{r}.jsonl")
        sft = next((p for p in parents if p.stage == "sft"), None)
        base = sft.info.get("base_model", str(sft.model)) if sft is not None else stage.cfg.model.name_or_path
        stage.commit(staged, parents, base, metrics, extra_dirs={PAIRS_DIR: pairs},
                     history=done.history, extra={"rounds": done.summaries, "warnings": done.warnings})
        print_summary(stage.cfg.stage.name, metrics, stage.out)
        _tidy(work, keep_models=adapters)
    distributed.barrier()
    return StageResult(stage.out, metrics, done.model)


def _tidy(work: Path, keep_models: bool) -> None:
    for other in work.parent.iterdir():
        if other != work:
            shutil.rmtree(other, ignore_errors=True)
    if not keep_models:
        for model in work.glob(f"round-*/{handoff.MODEL_DIR}"):
            shutil.rmtree(model, ignore_errors=True)


def checks(cfg) -> list[str]:
    """dpo's rules between keys, and: the sampler is transformers' generate (rollout.engine=vllm is ppo's and
    grpo's)."""
    out = dpo.checks(cfg)
    if "rollout" in cfg and cfg.rollout.engine == "vllm":
        out.append("rollout.engine=vllm: iterative_dpo samples with transformers' generate; set rollout.engine=hf "
                   "(or auto)")
    return out


def footprint(cfg) -> Footprint:
    """DPO's models while a round trains; before it, the whole policy (and a reward model judging) sampling
    sample_batch_size x samples_per_prompt answers at a time."""
    s, trained = cfg.stage, dpo.footprint(cfg)
    judge = (Held("reward model", score_head=True),) if "rm" in rewards.components_of(cfg.reward, "checker") else ()
    return Footprint(trained.models + judge, rollout_sequences=s.sample_batch_size * s.samples_per_prompt,
                     rollout_tokens=s.max_prompt_length + s.max_new_tokens, sampling_apart=True, pair_rows=2)


def _parents(cfg) -> list[tuple[str, str | None]]:
    return online.parents_with_reward_model(cfg, "checker")


SPEC = StageSpec(
    name="iterative_dpo", schema=IterativeDPOStageConfig, run=run, parents=_parents, checks=checks, footprint=footprint,
    lr={"tiny": 3e-4, "full": 5e-7, "adapter": 5e-6}, policy=True, reads_reward=True, default_reward="checker",
    headline=("round_1/sampled_reward_mean", "last_round/sampled_reward_mean", "last_round/pairs", "first_loss",
              "last_loss"))
