"""The stage-output contract: `runs/<run.name>/<stage>/{model/, stage.json, config.yaml, checkpoints/}`.

`stage.json` is written last, atomically; a directory without it is incomplete and never picked
up. A re-run keeps the previous complete output in place until the new one is ready, then swaps.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

STAGE_JSON = "stage.json"
MODEL_DIR = "model"
CONFIG_YAML = "config.yaml"
CHECKPOINTS = "checkpoints"
HISTORY = "history.jsonl"  # one line per logged step (training curves for summaries and plots)
RESULTS_MD = "results.md"  # the eval stage's table
# keys that do not change what a stage computes: left out of the config hash
UNHASHED_KEYS = ("run", "logger", "pipeline", "plan")  # and a recipe's per-stage sections (one per registered stage)


class HandoffError(RuntimeError):
    pass


def stage_dir(cfg: DictConfig, stage: str | None = None) -> Path:
    return Path(cfg.run.root) / cfg.run.name / (stage or cfg.stage.name)


def is_complete(path: Path) -> bool:
    return (path / STAGE_JSON).is_file()


def read_stage_json(path: Path) -> dict:
    return json.loads((path / STAGE_JSON).read_text())


def identity(cfg: DictConfig) -> dict:
    """What a stage's output depends on besides its parents: the resolved config (less the keys that do
    not change what it computes) and the content of its inputs (data files, a local base model)."""
    from align.run import fingerprint
    return {"config": _hashed(OmegaConf.to_container(cfg, resolve=True)), "inputs": fingerprint.inputs(cfg)}


def _hashed(config: dict) -> dict:
    """A resolved config less the keys that do not change what its stage computes."""
    from align.config.registry import reads_env, reads_reward, reads_rollout, registry

    for key in (*UNHASHED_KEYS, *registry()):
        config.pop(key, None)
    if not reads_reward(config.get("stage", {}).get("name")):  # the reward group counts where it applies
        config.pop("reward", None)
    if not reads_rollout(config.get("stage", {}).get("name")):  # so does the rollout group
        config.pop("rollout", None)
    if not reads_env(config.get("stage", {}).get("name")):  # and the env group
        config.pop("env", None)
    return config


def config_hash(cfg: DictConfig, ident: dict | None = None) -> str:
    """The hash of identity(cfg); pass `ident` when it is at hand."""
    blob = json.dumps(ident if ident is not None else identity(cfg), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _flat(data, prefix: str = "") -> dict:
    if isinstance(data, dict):
        out = {}
        for k, v in data.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): data}


def changes(old: dict, new: dict, most: int = 6) -> str:
    """`train.lr: 0.001 -> 0.002; data.train content changed` between two identities."""
    a, b = _flat(old.get("config", {})), _flat(new.get("config", {}))
    def shown(flat: dict, key: str) -> str:  # as the user writes it on the command line
        return "(unset)" if key not in flat else "null" if flat[key] is None else str(flat[key])

    out = [f"{k}: {shown(a, k)} -> {shown(b, k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    for key in sorted(set(old.get("inputs", {})) | set(new.get("inputs", {}))):
        if old.get("inputs", {}).get(key) != new.get("inputs", {}).get(key):
            out.append(f"{key} content changed")
    if not out:
        return "no key differs (an older version of align wrote it)"
    return "; ".join(out[:most]) + (f" (+{len(out) - most} more)" if len(out) > most else "")


def recorded_identity(path: Path) -> dict:
    """The identity a complete stage was trained with (its config.yaml and recorded inputs)."""
    config = OmegaConf.to_container(OmegaConf.load(path / CONFIG_YAML), resolve=False) if (path / CONFIG_YAML).is_file() else {}
    return {"config": _hashed(config), "inputs": read_stage_json(path).get("inputs", {})}


@dataclass
class Parent:
    stage: str
    path: Path  # the stage directory (or any model directory given by the user)
    model: Path  # the loadable model directory
    info: dict  # its stage.json, or {} for a plain model directory

    def as_record(self) -> dict:
        return {"stage": self.stage, "path": str(self.path), "config_hash": self.info.get("config_hash"),
                "output_id": self.info.get("output_id")}

    @property
    def identity(self) -> str:
        """What the child was trained from: the parent output's id (new on every commit), else its path."""
        return self.info.get("output_id") or str(self.path.resolve())


BASE = "base"  # stage.init=base: start from model.name_or_path even when the run has the parent stage


def find_parent(cfg: DictConfig, parent_stage: str, override: str | None = None) -> Parent | None:
    """The completed `parent_stage` of this run, or the directory the user named with an override.

    Returns None when the run has no such stage and nothing was named, or when the override is
    `base` (the caller then starts from `model.name_or_path`).
    """
    if override == BASE:
        return None
    if override:
        path = Path(override).expanduser()
        if is_complete(path):
            return Parent(parent_stage, path, path / MODEL_DIR, read_stage_json(path))
        if (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
            return Parent(parent_stage, path, path, {})
        raise HandoffError(f"{path} is neither a completed stage directory (with {STAGE_JSON}) nor a model directory")
    path = stage_dir(cfg, parent_stage)
    if is_complete(path):
        return Parent(parent_stage, path, path / MODEL_DIR, read_stage_json(path))
    if path.exists():
        raise HandoffError(
            f"{path} exists but has no {STAGE_JSON}: the {parent_stage} stage did not finish. "
            f"Re-run it (python -m align stage={parent_stage} run.name={cfg.run.name}) or pass stage.init=PATH"
        )
    return None


def atomic_write_text(path: Path, text: str) -> None:
    """`text` in `path`, whole or not at all (written beside it, synced, renamed over it)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def staged_path(out: Path, name: str = MODEL_DIR) -> Path:
    """Where an output folder of a stage (model/, PPO's critic/) is written before the commit swaps it in."""
    return out / f".{name}.new"


def staging_dir(out: Path, name: str = MODEL_DIR) -> Path:
    """staged_path(out, name), emptied and created."""
    tmp = staged_path(out, name)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _swap_in(out: Path, name: str, staged: Path) -> None:
    final, old = out / name, out / f".{name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(staged, final)
    shutil.rmtree(old, ignore_errors=True)


def commit(out: Path, staged_model: Path | None, cfg: DictConfig, record: dict,
           extra_dirs: dict[str, Path] | None = None, history: list[dict] | None = None,
           extra_files: dict[str, str] | None = None) -> dict:
    """Swap the staged model (and any extra staged folders) in, write config.yaml, the history and any
    extra files, then stage.json last. `staged_model` None: a stage without a model (eval)."""
    (out / STAGE_JSON).unlink(missing_ok=True)  # from here until the end the directory reads as incomplete
    if staged_model is not None:
        _swap_in(out, MODEL_DIR, staged_model)
    for name, staged in (extra_dirs or {}).items():
        _swap_in(out, name, staged)
    for name, text in (extra_files or {}).items():
        atomic_write_text(out / name, text)
    atomic_write_text(out / CONFIG_YAML, OmegaConf.to_yaml(cfg, resolve=True))
    atomic_write_text(out / HISTORY, "".join(json.dumps(h, default=str) + "\n" for h in history or []))
    # output_id: new on every commit, so a child can tell that its parent was re-trained (the cache)
    record = {**record, "output_id": uuid.uuid4().hex, "completed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_text(out / STAGE_JSON, json.dumps(record, indent=2, default=str) + "\n")
    return record


def read_history(path: Path) -> list[dict]:
    file = path / HISTORY
    if not file.is_file():
        return []
    return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("align", "torch", "transformers", "trl", "peft", "datasets", "deepspeed", "bitsandbytes"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
