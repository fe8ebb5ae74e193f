"""`python -m align stage=<name> [overrides]` (also the `align` console script).

Drops the DeepSpeed launcher's `--local_rank` before Hydra parses the command line, then runs the
selected stage from align/stages/<name>.py.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings

COMMANDS = ("export",)  # `python -m align export stage=rm run.name=x`
_LOCAL_RANK = re.compile(r"^--local[_-]rank(=(\d+))?$")


def implicit_data_group(args: list[str]) -> list[str]:
    """`data.train=mine.jsonl` (or a recipe's `sft.data.train=...`) without a `data=` group selects
    `data=custom`: the demo group's training settings (64 tokens, batch 16, 3 epochs) are for the demo's
    data and the tiny model, and must not cut a user's conversations to 64 tokens without a word."""
    if any(a.lstrip("+~").startswith("data=") for a in args):
        return args
    for a in args:
        key, _, value = a.lstrip("+~").partition("=")
        if key == "data.train" and value.startswith("task:"):  # a zoo task: its own group (sizes, checker)
            return [f"data=task/{value[len('task:'):]}", *args]
        if (key == "data.train" or key.endswith(".data.train")) and value not in ("", "demo") \
                and not value.startswith("task:"):
            return ["data=custom", *args]
    return args


def drop_local_rank(argv: list[str]) -> tuple[list[str], str | None]:
    """Split off `--local_rank=N` / `--local_rank N` (DeepSpeed's launcher adds it): (rest, N or None)."""
    out, skip_next, local_rank = [], False, None
    for i, arg in enumerate(argv):
        if skip_next:
            skip_next = False
            continue
        m = _LOCAL_RANK.match(arg)
        if m:
            value = m.group(2)
            if value is None and i + 1 < len(argv):
                value, skip_next = argv[i + 1], True
            local_rank = value if value is not None else local_rank
            continue
        out.append(arg)
    return out, local_rank


HELP = """align: post-training for causal language models. SFT -> reward model -> PPO (or DPO), and GRPO
with verifiable rewards, with LoRA/QLoRA and DeepSpeed ZeRO; each stage hands its output to the next inside runs/<run.name>/.

usage:
  python -m align stage=STAGE [key=value ...]      one stage (default: sft on the tiny demo model)
  python -m align recipe=RECIPE [key=value ...]    a whole pipeline, skipping stages that are up to date
  python -m align -m recipe=RECIPE dpo.beta=0.05,0.1  a sweep (one job per value)
  python -m align export stage=STAGE run.name=NAME  merge a LoRA stage into full weights
  python -m align --cfg job [overrides]           print the resolved config, run nothing
  deepspeed --num_gpus N launch/sft.sh [overrides]  several GPUs (launch/*.sh)

stages:   {stages}
recipes:  {recipes}
config groups (group=option):
{groups}
keys:     run.name, run.root, run.force, train.lr, train.epochs, train.max_steps, train.batch_size,
          data.train, data.eval, model.name_or_path, stage.<key> (e.g. stage.beta), ...
          inside a recipe a stage's keys take its name: dpo.beta=0.1, sft.train.epochs=2
examples:
  python -m align stage=sft model.name_or_path=/models/Qwen2.5-0.5B data.train=mine.jsonl peft=lora
  python -m align recipe=demo
Hydra's own help: --hydra-help. Docs: README.md and docs/ in the repository."""


def group_options() -> dict[str, list[str]]:
    """Every config group a user selects with `group=option`, with its options: the conf/ groups, the recipes
    (shipped and ./recipes/) and the stages. Read from the files, without importing torch or Hydra."""
    from pathlib import Path

    here = Path(__file__).resolve().parent
    conf = next(d for d in (here.parent / "conf", here / "conf") if (d / "config.yaml").is_file())
    out = {}
    for group in sorted(p for p in conf.iterdir() if p.is_dir() and not p.name.startswith("_")):
        if group.name == "stage":
            continue
        out[group.name] = sorted(str(p.relative_to(group).with_suffix("")) for p in group.rglob("*.yaml"))
    out["recipe"] = sorted({p.stem for d in (here.parent / "recipes", here / "recipe_files", Path.cwd() / "recipes")
                            if d.is_dir() for p in d.glob("*.yaml")})
    from align.stages import names

    out["stage"] = list(names())
    return out


def print_help() -> None:
    """--help without importing torch or Hydra's app (under a second)."""
    options = group_options()
    groups = [f"  {g + ':':11s}{', '.join(o)}" for g, o in options.items() if g not in ("stage", "recipe")]
    print(HELP.format(stages=", ".join(options["stage"]), recipes=", ".join(options["recipe"]),
                      groups="\n".join(groups)))


def unknown_choices(args: list[str]) -> list[str]:
    """`group=option` arguments whose option does not exist, each with the valid names: Hydra ignores an unknown
    option of an optional group (`recipe=rlhf_pop` ran the default stage=sft) and lists internal `*_schema`
    options for the others. Sweep lists (`recipe=a,b` with -m) are checked value by value; sweep functions
    (`choice(...)`, `glob(...)`) are left to Hydra."""
    options, out = None, []
    sweep = "-m" in args or "--multirun" in args
    for a in args:
        if a.startswith("-") or a.startswith("~") or "=" not in a:
            continue
        key, _, value = a.lstrip("+").partition("=")
        if "." in key or "/" in key or "(" in value or value in ("", "null"):
            continue
        if options is None:
            options = group_options()
        if key not in options:
            continue
        for v in (value.split(",") if sweep else [value]):
            if v not in options[key]:
                out.append(f"{key}={v}: there is no {key} named {v!r}; choose one of {', '.join(options[key])}")
    return out


# Third-party log lines a user would read as an error, dropped by their exact format string (logger -> messages).
# bitsandbytes 0.50 on a CPU with AVX512-BF16 tries to fetch a kernel from the hub at import and logs its failure
# (the exception names trust_remote_code, or offline "Download the kernel while online first"); align keeps
# bitsandbytes on its exact fp32 path there anyway (models.loading.exact_cpu_4bit_kernels), and 4-bit works.
NOISE = {
    "bitsandbytes.backends.cpu.ops": (
        "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already `pip install "
        "kernels` and the kernels >= 0.11.1",),
}


class DropMessages(logging.Filter):
    def __init__(self, messages):
        super().__init__()
        self.messages = set(messages)

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg not in self.messages


def _quiet_third_party() -> None:
    for logger, messages in NOISE.items():
        if not any(isinstance(f, DropMessages) for f in logging.getLogger(logger).filters):
            logging.getLogger(logger).addFilter(DropMessages(messages))
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _has_cuda() else "cuda")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*torch.utils._pytree.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    import datasets

    datasets.disable_progress_bars()  # the training bar is the one that matters
    logging.getLogger("alembic").setLevel(logging.WARNING)  # the Optuna sweeper's storage logs every plugin it loads


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def dispatch(cfg, command: str = "train", task_overrides: list[str] | None = None, sweep_name: str | None = None):
    """A recipe (pipeline.stages set) runs its stages in order; otherwise the one `stage` runs, unless its
    complete output already is what this config would train (then nothing changes; run.force=true re-trains)."""
    from align import pipeline, recipes, supported, validate

    bad_name = validate.run_name_problem(cfg.run.name)
    if bad_name:
        raise supported.Unsupported(bad_name + " (nothing was run)")
    unknown = validate.unknown_keys(cfg)
    if unknown:
        raise supported.Unsupported("unknown config keys (nothing was run):\n" + "\n".join(f"  - {u}" for u in unknown))
    if cfg.pipeline.stages and command == "train":
        return pipeline.run(cfg, task_overrides or [], sweep_name)
    recipes.check(cfg, task_overrides or [])
    cfg = recipes.strip(cfg)
    if command == "export":
        from align.export import run

        return run(cfg)
    name = cfg.stage.name
    from align import stages

    stages.get(name)  # an unknown name stops here, naming the stages there are
    from align import preflight

    supported.check(cfg)  # every value, before any model is loaded
    done = None if cfg.run.force else up_to_date(cfg)
    if done is not None:
        return done
    preflight.check(cfg)
    return pipeline.run_stage(cfg)


def up_to_date(cfg):
    """The complete output's StageResult when it is what `cfg` would train now (same config, data and
    parents), else None (and the reason is said when an output exists)."""
    from align import cache, handoff, tracking
    from align.stages.common import StageResult

    decision = cache.decide(cfg, force=False)
    out = handoff.stage_dir(cfg)
    say = logging.getLogger("align").info if tracking.is_main_process() else (lambda *a: None)
    if decision.action == cache.SKIP:
        say("%s: up to date (%s: %s); nothing changed. run.force=true re-trains it",
            cfg.stage.name, out, decision.reason)
        return StageResult(out, handoff.read_stage_json(out).get("metrics", {}))
    if handoff.is_complete(out):
        say("%s: re-training (%s); the complete output stays in %s until the new one commits",
            cfg.stage.name, decision.reason, out)
    return None


def say_once(error: Exception) -> None:
    """align's message for an error every rank meets alike (bad config, data or folder): printed by rank 0 only, so
    a run on 8 ranks shows it once; every rank still exits with its code."""
    if os.environ.get("RANK", "0") == "0":
        logging.getLogger("align").error("%s", error)


def main() -> None:
    args, local_rank = drop_local_rank(sys.argv[1:])
    if "--help" in args or "-h" in args:
        print_help()
        return
    command = "train"
    if args and args[0] in COMMANDS:
        command = args.pop(0)
    args = implicit_data_group(args)
    unknown = unknown_choices(args)
    if unknown:  # before Hydra, torch or any model: the names that do not exist, and the ones that do
        print("[align] " + "\n[align] ".join(unknown) + "\n[align] nothing was run", file=sys.stderr)
        sys.exit(2)
    sys.argv = [sys.argv[0], *args]
    if local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", local_rank)
    _quiet_third_party()
    logging.basicConfig(level=logging.INFO, format="[align] %(message)s")

    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from align.config import config_dir, register
    from align.data.errors import DataError
    from align.handoff import HandoffError
    from align.models.loading import ModelLoadError
    from align.preemption import Preempted, TrainingDiverged
    from align.recipes import RecipeError
    from align.rewards import RewardError
    from align.stages import UnknownStage
    from align.supported import Unsupported

    register()

    @hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")
    def _run(cfg):
        from align.pipeline import job_name, swept_keys

        hc = HydraConfig.get()
        task = list(hc.overrides.task)
        sweep_name = None
        if hc.mode == RunMode.MULTIRUN:
            sweep_name = job_name(task, swept_keys(args, hc.sweeper.get("params")))
        choice = hc.runtime.choices.get("stage", "")
        if choice.endswith("_schema"):
            from align.stages import names

            logging.getLogger("align").error("stage=%s is not a stage; choose one of %s", choice, ", ".join(names()))
            sys.exit(2)
        try:
            return dispatch(cfg, command, task, sweep_name)
        except (DataError, HandoffError, ModelLoadError, RecipeError, RewardError, UnknownStage, Unsupported) as e:
            say_once(e)
            sys.exit(2)
        except Preempted as e:  # checkpoint saved: 143 (SIGTERM) / 130 (SIGINT) tells the scheduler to requeue
            logging.getLogger("align").error("%s", e)  # every rank says where it stopped and saved
            sys.exit(e.code)
        except TrainingDiverged as e:
            say_once(e)
            sys.exit(3)

    _run()


if __name__ == "__main__":
    main()
