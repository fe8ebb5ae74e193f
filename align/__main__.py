"""`python -m align stage=<name> [overrides]` (also the `align` console script).

The command line: `--help` without importing torch, DeepSpeed's `--local_rank` dropped and unknown group options
refused before Hydra parses anything, then the composed config goes to align/run/orchestrate.py (one stage or a
recipe), and align's errors become exit codes (2: bad config, data or folder; 3: diverged; 130/143: preempted,
checkpoint saved).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings

COMMANDS = ("export", "plan")  # `python -m align export stage=rm run.name=x`, `python -m align plan recipe=...`
_LOCAL_RANK = re.compile(r"^--local[_-]rank(=(\d+))?$")


GYM = "gym:"


def gym_arguments(args: list[str]) -> list[str]:
    """`data=gym:<task>` is `data=gym data.train=gym:<task>` (reasoning-gym has about 100 tasks: one group serves
    them all), and a task option `data.gym.<key>=v` is added to the empty dict (`++`: Hydra wants `+` for a key
    the config does not have yet)."""
    out = []
    for a in args:
        key, _, value = a.partition("=")
        if key == "data" and value.startswith(GYM):
            out += ["data=gym", f"data.train={value}"]
        elif (key.startswith("data.gym.") or ".data.gym." in key) and not key.startswith(("+", "~")):
            out.append("++" + a)
        else:
            out.append(a)
    return out


def implicit_data_group(args: list[str]) -> list[str]:
    """`data.train=mine.jsonl` (or a recipe's `sft.data.train=...`) without a `data=` group selects
    `data=custom`: the demo group's training settings (64 tokens, batch 16, 3 epochs) are for the demo's
    data and the tiny model, and must not cut a user's conversations to 64 tokens without a word."""
    args = gym_arguments(args)
    if any(a.lstrip("+~").startswith("data=") for a in args):
        return args
    for a in args:
        key, _, value = a.lstrip("+~").partition("=")
        if key == "data.train" and value.startswith("task:"):  # a zoo task: its own group (sizes, checker)
            return [f"data=task/{value[len('task:'):]}", *args]
        if key == "data.train" and value.startswith(GYM):  # a reasoning-gym task: the gym group
            return ["data=gym", *args]
        if (key == "data.train" or key.endswith(".data.train")) and value not in ("", "demo") \
                and not value.startswith(("task:", GYM)):
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
  python -m align stage=STAGE [key=value ...]      one stage (the tiny demo model unless model.name_or_path)
  python -m align recipe=RECIPE [key=value ...]    a whole pipeline, skipping stages that are up to date
  python -m align -m recipe=RECIPE STAGE.KEY=A,B   a sweep (one job per value)
  python -m align export stage=STAGE run.name=NAME  merge a LoRA stage into full weights
  python -m align plan recipe=RECIPE plan.gpus=8 plan.gpu_memory=80GB   will each stage fit? (loads nothing)
  python -m align --cfg job [overrides]           print the resolved config, run nothing
  deepspeed --num_gpus N launch/stage.sh stage=STAGE [overrides]  several GPUs (launch/*.sh)

stages:   {stages}
recipes:  {recipes}
config groups (group=option):
{groups}
keys:     run.name, run.root, run.force, train.lr, train.epochs, train.max_steps, train.batch_size,
          data.train, data.eval, model.name_or_path, stage.<key> (e.g. stage.beta), ...
          inside a recipe a stage's keys take its name: STAGE.KEY=VALUE, STAGE.train.epochs=2
examples:
  python -m align stage={first} model.name_or_path=/models/Qwen2.5-0.5B data.train=mine.jsonl peft=lora
  python -m align recipe=demo
Hydra's own help: --hydra-help. Docs: README.md and docs/ in the repository."""


def group_options() -> dict[str, list[str]]:
    """Every config group a user selects with `group=option`, with its options: the conf/ groups, the recipes
    (shipped and ./recipes/) and the stages. Read from the files, without importing torch or Hydra."""
    from align.config.paths import config_dir, recipe_dirs
    from align.config.registry import names

    conf = config_dir()
    out = {}
    for group in sorted(p for p in conf.iterdir() if p.is_dir() and not p.name.startswith("_")):
        out[group.name] = sorted(str(p.relative_to(group).with_suffix("")) for p in group.rglob("*.yaml"))
    out["recipe"] = sorted({p.stem for d in recipe_dirs() for p in d.glob("*.yaml")})

    out["stage"] = list(names())
    return out


def print_help() -> None:
    """--help without importing torch or Hydra's app (under a second)."""
    options = group_options()
    groups = [f"  {g + ':':11s}{', '.join(o)}" for g, o in options.items() if g not in ("stage", "recipe")]
    print(HELP.format(stages=", ".join(options["stage"]), recipes=", ".join(options["recipe"]),
                      groups="\n".join(groups), first=options["stage"][0]))


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
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # the training bar is the one that matters
    logging.getLogger("alembic").setLevel(logging.WARNING)  # the Optuna sweeper's storage logs every plugin it loads


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def dispatch(cfg, command: str = "train", task_overrides: list[str] | None = None, sweep_name: str | None = None):
    """The composed config handed to the one path for stages and recipes (align/run/orchestrate.py)."""
    from align.run.orchestrate import run

    return run(cfg, task_overrides or [], sweep_name, command)


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
    _hydra_main(args, command)


def _hydra_main(args: list[str], command: str) -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from align.config.paths import config_dir
    from align.config.recipes import register

    register()

    @hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")
    def _run(cfg):
        from align.run.orchestrate import job_name, swept_keys

        hc = HydraConfig.get()
        task = list(hc.overrides.task)
        sweep_name = None
        if hc.mode == RunMode.MULTIRUN:
            sweep_name = job_name(task, swept_keys(args, hc.sweeper.get("params")))
        return _exit_codes(lambda: dispatch(cfg, command, task, sweep_name))

    _run()


def _exit_codes(run):
    """run(), align's errors turned into exit codes: 2 bad config, data, folder or model; 3 diverged; 130/143
    preempted (checkpoint saved: the scheduler requeues)."""
    from align.config.recipes import RecipeError
    from align.config.registry import UnknownStage
    from align.config.rules import Unsupported
    from align.data.errors import DataError
    from align.models.loading import ModelLoadError
    from align.rewards import RewardError
    from align.run.handoff import HandoffError
    from align.run.preemption import Preempted, TrainingDiverged

    try:
        return run()
    except (DataError, HandoffError, ModelLoadError, RecipeError, RewardError, UnknownStage, Unsupported) as e:
        say_once(e)
        sys.exit(2)
    except Preempted as e:
        logging.getLogger("align").error("%s", e)  # every rank says where it stopped and saved
        sys.exit(e.code)
    except TrainingDiverged as e:
        say_once(e)
        sys.exit(3)


if __name__ == "__main__":
    main()
