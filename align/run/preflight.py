"""Checks that need no model: that the run folder can be written and the base model can be found.

Run before anything loads, so a typo in a path or a missing network costs a second, not a traceback
after minutes of loading (a hub name with no network otherwise retries for 25-60 s).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from omegaconf import DictConfig

from align.config.rules import Unsupported

PATH_PREFIXES = ("/", "./", "../", "~")


def writable_problem(cfg: DictConfig) -> str | None:
    """run.root must be writable where the stage folder will be made (the nearest existing folder)."""
    target = Path(cfg.run.root).expanduser() / cfg.run.name
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        if not probe.is_dir():
            raise NotADirectoryError(f"{probe} is not a folder")
        os.rmdir(tempfile.mkdtemp(prefix=".align-write-test-", dir=probe))  # root ignores permission bits: try it
        return None
    except OSError as e:
        why = f"{probe}: {e.strerror}" if e.strerror else str(e)
    return (f"run.root={cfg.run.root}: cannot write {target} ({why}). "
            f"Fix: set run.root to a folder you can write, e.g. run.root=$HOME/align-runs")


def model_problem(name: str, revision: str | None = None) -> str | None:
    """Why `name` (model.name_or_path) cannot be loaded, or None: a missing local directory, a folder with
    no model in it, or a hub name that is neither reachable nor in the local cache."""
    from align.models.tiny import BUILTIN_PREFIX

    if name.startswith(BUILTIN_PREFIX):
        return None
    path = Path(name).expanduser()
    if path.exists():
        if path.is_dir() and not any((path / f).is_file() for f in ("config.json", "adapter_config.json")):
            return (f"model.name_or_path={name}: the folder has no config.json (nor adapter_config.json), so it is "
                    "not a model directory. Fix: point it at the folder that holds config.json and the weights")
        return None
    if name.startswith(PATH_PREFIXES) or name.count("/") > 1 or "\\" in name:
        return (f"model.name_or_path={name}: no such directory. Fix: check the path (relative paths are from "
                f"{Path.cwd()}), or give a hub id such as Qwen/Qwen2.5-0.5B-Instruct")
    return _hub_problem(name, revision)


def _hub_problem(name: str, revision: str | None) -> str | None:
    import huggingface_hub as hub

    cached = isinstance(hub.try_to_load_from_cache(name, "config.json", revision=revision), str)
    if cached:
        return None
    if hub.constants.HF_HUB_OFFLINE:
        return (f"model.name_or_path={name}: HF_HUB_OFFLINE is set and the model is not in the local Hugging Face "
                "cache. Fix: download it once with network (huggingface-cli download NAME), or point "
                "model.name_or_path at a local copy")
    try:
        hub.get_hf_file_metadata(hub.hf_hub_url(name, "config.json", revision=revision), timeout=10)
    except hub.errors.GatedRepoError:
        return (f"model.name_or_path={name} is gated on the hub. Fix: accept its licence on its hub page and log "
                "in (huggingface-cli login), or point model.name_or_path at a local copy")
    except (hub.errors.RepositoryNotFoundError, hub.errors.EntryNotFoundError, hub.errors.RevisionNotFoundError):
        return (f"model.name_or_path={name}: no such model on the hub (or it is private). Fix: check the name, "
                "or log in (huggingface-cli login) for a private model")
    except Exception as e:  # no network: DNS, refused connection, timeout
        return (f"model.name_or_path={name}: the hub cannot be reached ({type(e).__name__}: {str(e)[:120]}) and the "
                "model is not in the local cache. Fix: point model.name_or_path at a local directory, or run where "
                "the hub is reachable")
    return None


def uses_base_model(cfg: DictConfig) -> bool:
    """Whether the stage loads model.name_or_path itself: a training stage with stage.init=base, or whose declared
    parents (its StageSpec.parents) resolve to none."""
    from align.config.registry import get
    from align.run import cache, handoff

    if not get(cfg.stage.name).trains:
        return False
    if cfg.stage.get("init") == handoff.BASE:
        return True
    parents = cache.current_parents(cfg)
    return parents is not None and not parents


def check(cfg: DictConfig) -> None:
    """Raise Unsupported with every problem found (one stage's config)."""
    found = [p for p in (writable_problem(cfg),) if p]
    if uses_base_model(cfg):
        problem = model_problem(cfg.model.name_or_path, cfg.model.revision)
        if problem:
            found.append(problem)
    if found:
        raise Unsupported(f"stage={cfg.stage.name}: cannot start:\n" + "\n".join(f"  - {p}" for p in found))
    from align.plan.report import preflight as memory_preflight

    memory_preflight(cfg)  # on a GPU: warns (plan.strict: refuses) when the memory plan does not fit
