"""The launch/<stage>.sh files: one file that is both a bash script and a Python script.

    bash launch/dpo.sh --num_gpus 2 deepspeed=zero3 peft=lora
        bash runs line 1: `python3 launch/dpo.sh --from-bash <args>` ($PYTHON overrides python3);
        that splits launcher options from overrides (split_launcher_args) and execs
        `deepspeed <launcher options> launch/dpo.sh <overrides>`.
    deepspeed --num_gpus 2 launch/dpo.sh deepspeed=zero3     (or literally `deepspeed launch/dpo.sh`)
        the launcher runs `python -u launch/dpo.sh --local_rank=N <overrides>` in every rank; Python
        reads line 1 as a string and calls run_stage("dpo"), which adds `stage=dpo` (and
        `deepspeed=zero2` unless a deepspeed= override is given) and runs `python -m align`.
"""

from __future__ import annotations

import os
import sys

DEFAULT_DEEPSPEED = "zero2"
FROM_BASH = "--from-bash"
# DeepSpeed launcher options that take no value; every other `-x`/`--x` option takes one.
LAUNCHER_FLAGS = {
    "--module", "--no_python", "--no_local_rank", "--no_ssh", "--no_ssh_check", "--force_multi", "--save_pid",
    "--bind_cores_to_rank", "--elastic_training", "-q", "--quiet",
}


def split_launcher_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(DeepSpeed launcher options, Hydra overrides). Options start with '-'; overrides never do."""
    launcher, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("-"):
            launcher.append(arg)
            if "=" not in arg and arg not in LAUNCHER_FLAGS:
                if i + 1 >= len(argv):
                    raise SystemExit(f"launcher option {arg} needs a value")
                launcher.append(argv[i + 1])
                i += 1
        else:
            overrides.append(arg)
        i += 1
    return launcher, overrides


RECIPE = "recipe"  # launch/recipe.sh: a whole recipe (recipe=NAME among the overrides) instead of one stage
ANY = "stage"  # launch/stage.sh: the stage named by the stage= override


def stage_argv(stage: str, overrides: list[str]) -> list[str]:
    """The `python -m align` arguments a launch file runs: its stage, ZeRO-2 unless told otherwise."""
    extra = [] if any(o.startswith("deepspeed=") for o in overrides) else [f"deepspeed={DEFAULT_DEEPSPEED}"]
    if stage == ANY:
        if not any(o.startswith("stage=") for o in overrides):
            raise SystemExit("launch/stage.sh needs the stage to run: stage=NAME (python -m align --help lists them)")
        return [*extra, *overrides]
    for o in overrides:
        if o.startswith(("stage=", "+stage=", "stage/")):
            raise SystemExit(f"launch/{stage}.sh runs stage={stage}; use launch/stage.sh stage=NAME for another stage")
    if stage == RECIPE:
        if not any(o.startswith("recipe=") for o in overrides):
            raise SystemExit("launch/recipe.sh needs the recipe to run: recipe=NAME (see recipes/)")
        return [*extra, *overrides]
    return [f"stage={stage}", *extra, *overrides]


def run_stage(stage: str) -> None:
    """Inside a rank: hand the command line (minus --local_rank, dropped by align's entry) to align."""
    from align.__main__ import main

    sys.argv = [sys.argv[0], *stage_argv(stage, sys.argv[1:])]
    main()


def exec_launcher(script: str, argv: list[str]) -> None:
    """From bash: replace this process with the DeepSpeed launcher running `script` in every rank."""
    launcher, overrides = split_launcher_args(argv)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", *launcher, script, *overrides]
    os.execv(sys.executable, cmd)


def main(stage: str, script: str) -> None:
    """The body of launch/<stage>.sh."""
    if sys.argv[1:2] == [FROM_BASH]:
        exec_launcher(script, sys.argv[2:])
    else:
        run_stage(stage)
