"""W&B: one run per stage, offline without a key, resumed under the same id when the stage resumes."""

from __future__ import annotations

import netrc
import os
import uuid
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

WANDB_ID_FILE = "wandb_id"


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_mode(cfg: DictConfig) -> str:
    if cfg.logger.mode:
        return cfg.logger.mode
    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "dryrun"):
        return "offline" if os.environ["WANDB_MODE"] == "dryrun" else os.environ["WANDB_MODE"]
    return "online" if has_wandb_key() else "offline"


def start(cfg: DictConfig, out_dir: Path):
    """Start (or resume) this stage's W&B run on the main process; None when logging is off."""
    if cfg.logger.backend == "none" or not is_main_process():
        return None
    if cfg.logger.backend != "wandb":
        raise ValueError(f"logger.backend must be none or wandb, got {cfg.logger.backend!r}")
    import wandb

    id_file = out_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id + "\n")
    return wandb.init(
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        group=cfg.logger.group,
        tags=list(cfg.logger.tags),
        name=cfg.logger.name or f"{cfg.run.name}-{cfg.stage.name}",
        id=run_id,
        resume="allow",
        mode=wandb_mode(cfg),
        dir=str(out_dir),
        config=OmegaConf.to_container(cfg, resolve=True),
    )


def finish(run, summary: dict | None = None) -> None:
    if run is None:
        return
    if summary:
        run.summary.update(summary)
    run.finish()
