"""The stage cache of a pipeline: skip what is up to date, reuse what another run already trained.

A stage's complete output is up to date when its stage.json records the same config hash and was
trained from the same parent outputs that the stage would start from now (each commit gets a new
`output_id`, so a re-trained parent makes every child stale, all the way downstream). A stage that is
not up to date in this run may reuse a complete output elsewhere under `run.root` with the same
hash and parents — the jobs of a sweep share their SFT this way: the stage directory becomes a
relative symlink to it. A stage that must train never writes through such a link: StageRun replaces
the link by a real directory first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from align.run import handoff
SKIP, REUSE, RUN = "up to date", "reuse", "run"
CONFIG_CHANGED = "config or data changed"
SEARCH_DEPTH = 3  # run.root/<name>/<stage>, run.root/<sweep>/<job>/<stage>, one more level


def parent_specs(cfg: DictConfig) -> list[tuple[str, str | None]]:
    """(parent stage, override) pairs the stage resolves with handoff.find_parent, as its StageSpec declares."""
    from align.config.registry import get

    return get(cfg.stage.name).parents(cfg)


def current_parents(cfg: DictConfig) -> list[handoff.Parent] | None:
    """The parents the stage would start from now; None when one of them is incomplete."""
    try:
        found = [handoff.find_parent(cfg, stage, override) for stage, override in parent_specs(cfg)]
    except handoff.HandoffError:
        return None
    return [p for p in found if p is not None]


def _identities(records: list[dict]) -> list[str]:
    return sorted({r.get("output_id") or str(Path(r["path"]).resolve()) for r in records})


def matches(info: dict, cfg_hash: str, parents: list[handoff.Parent]) -> str | None:
    """None when the recorded output is what this config would train now; else the reason it is not."""
    if info.get("config_hash") != cfg_hash:
        return CONFIG_CHANGED
    recorded = info.get("parents", [])
    if _identities(recorded) != sorted({p.identity for p in parents}):
        stages = sorted({p.stage for p in parents} | {r["stage"] for r in recorded})
        changed = [s for s in stages if _identities([r for r in recorded if r["stage"] == s])
                   != sorted({p.identity for p in parents if p.stage == s})]
        return f"{'/'.join(changed)} output changed"
    return None


@dataclass
class Decision:
    action: str  # SKIP | REUSE | RUN
    reason: str
    source: Path | None = None  # for REUSE: the complete output to link to


def decide(cfg: DictConfig, force: bool) -> Decision:
    out = handoff.stage_dir(cfg)
    if force:
        return Decision(RUN, "forced (run.force or pipeline.force)")
    parents = current_parents(cfg)
    if parents is None:
        return Decision(RUN, "a parent stage is incomplete")
    cfg_hash = handoff.config_hash(cfg)
    reason = "no output yet"
    if handoff.is_complete(out):
        reason = matches(handoff.read_stage_json(out), cfg_hash, parents)
        if reason is None:
            return Decision(SKIP, "same config, data and parents")
        if reason == CONFIG_CHANGED:
            reason = f"changed: {handoff.changes(handoff.recorded_identity(out), handoff.identity(cfg))}"
    if not out.exists() or out.is_symlink():
        source = find_reusable(cfg, cfg_hash, parents)
        if source is not None:
            return Decision(REUSE, f"same config and parents as {source}", source)
    return Decision(RUN, reason)


def find_reusable(cfg: DictConfig, cfg_hash: str, parents: list[handoff.Parent]) -> Path | None:
    """The newest complete, real (not linked) output of this stage under run.root that matches."""
    root, here = Path(cfg.run.root), handoff.stage_dir(cfg)
    candidates = []
    for depth in range(1, SEARCH_DEPTH + 1):
        for path in _stage_dirs(root, cfg.stage.name, depth):
            if path.is_symlink() or not handoff.is_complete(path) or path.resolve() == here.resolve():
                continue
            if matches(handoff.read_stage_json(path), cfg_hash, parents) is None:
                candidates.append(path)
    return max(candidates, key=lambda p: (p / handoff.STAGE_JSON).stat().st_mtime, default=None)


def _stage_dirs(root: Path, name: str, depth: int) -> list[Path]:
    """The paths `root/*/.../name`, `depth` folders deep, that exist. Hidden folders (another rank's write probe,
    files being written) are not searched, and a folder that another process removes while it is listed is passed
    over: under `deepspeed --num_gpus N` one rank's preflight probe came and went while another rank searched."""
    level = [root]
    for _ in range(depth):
        below = []
        for folder in level:
            try:
                with os.scandir(folder) as entries:
                    below += [Path(e.path) for e in entries if not e.name.startswith(".") and e.is_dir()]
            except (FileNotFoundError, NotADirectoryError):
                continue
        level = sorted(below)
    return [folder / name for folder in level if (folder / name).exists() or (folder / name).is_symlink()]


def link(cfg: DictConfig, source: Path) -> Path:
    """Point this run's stage directory at `source` (relative, so the run root can move)."""
    out = handoff.stage_dir(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.is_symlink():
        out.unlink()
    os.symlink(os.path.relpath(source.resolve(), out.parent.resolve()), out, target_is_directory=True)
    return out
