"""`python -m align stage=<name> [overrides]` (also the `align` console script).

Drops the DeepSpeed launcher's `--local_rank` before Hydra parses the command line, then runs the
selected stage from align/stages/<name>.py.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import sys
import warnings

STAGES = ("sft", "rm", "dpo", "ppo", "eval")
COMMANDS = ("export",)  # `python -m align export stage=rm run.name=x`
_LOCAL_RANK = re.compile(r"^--local[_-]rank(=(\d+))?$")


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


def _quiet_third_party() -> None:
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
    """A recipe (pipeline.stages set) runs its stages in order; otherwise the one `stage` runs."""
    from align import pipeline, recipes

    if cfg.pipeline.stages and command == "train":
        return pipeline.run(cfg, task_overrides or [], sweep_name)
    recipes.check(cfg, task_overrides or [])
    cfg = recipes.strip(cfg)
    if command == "export":
        from align.export import run

        return run(cfg)
    name = cfg.stage.name
    if name not in STAGES:
        raise SystemExit(f"stage={name} is not available; choose one of {', '.join(STAGES)}")
    from align import supported

    supported.check(cfg)  # before any model is loaded
    module = importlib.import_module(f"align.stages.{name}")
    return module.run(cfg)


def main() -> None:
    args, local_rank = drop_local_rank(sys.argv[1:])
    command = "train"
    if args and args[0] in COMMANDS:
        command = args.pop(0)
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
    from align.preemption import Preempted, TrainingDiverged
    from align.recipes import RecipeError
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
        try:
            return dispatch(cfg, command, task, sweep_name)
        except (DataError, HandoffError, RecipeError, Unsupported) as e:
            logging.getLogger("align").error("%s", e)
            sys.exit(2)
        except Preempted as e:  # checkpoint saved: 143 (SIGTERM) / 130 (SIGINT) tells the scheduler to requeue
            logging.getLogger("align").error("%s", e)
            sys.exit(e.code)
        except TrainingDiverged as e:
            logging.getLogger("align").error("%s", e)
            sys.exit(3)

    _run()


if __name__ == "__main__":
    main()
