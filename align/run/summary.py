"""The end of a pipeline: a table in the terminal, `summary.md` and PNG training curves in the run dir.

Numbers come from each stage's stage.json (metrics) and history.jsonl (per-step logs), so a
skipped (up to date) stage is reported exactly as it was trained.
"""

from __future__ import annotations

import math
from pathlib import Path

from align.run import handoff
SUMMARY_MD = "summary.md"
PLOTS_DIR = "plots"
# plot panels: title -> history keys drawn in it (those logged are drawn)
PANELS = {
    "loss": ("loss", "eval_loss", "loss/policy", "loss/value"),
    "accuracy": ("mean_token_accuracy", "accuracy", "rewards/accuracies", "eval_mean_token_accuracy",
                 "eval_accuracy", "eval_rewards/accuracies"),
    "reward": ("margin", "rewards/margins", "rewards/chosen", "rewards/rejected", "eval_margin",
               "eval_rewards/margins", "reward/score_mean", "reward/shaped_mean", "reward/total_mean",
               "reward/checker"),
    "KL": ("objective/kl", "policy/approx_kl"),
}


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def headline(stage: str, metrics: dict) -> dict:
    from align.config.registry import registry

    spec = registry().get(stage)
    return {k: metrics[k] for k in (spec.headline if spec else ()) if k in metrics}


def curves(history: list[dict]) -> dict[str, dict[str, tuple[list, list]]]:
    """panel -> key -> (steps, values), finite numbers only, panels with no data left out."""
    out: dict[str, dict[str, tuple[list, list]]] = {}
    for panel, keys in PANELS.items():
        for key in keys:
            pts = [(h.get("step", i + 1), h[key]) for i, h in enumerate(history)
                   if isinstance(h.get(key), (int, float)) and math.isfinite(h[key])]
            if pts:
                out.setdefault(panel, {})[key] = ([p[0] for p in pts], [p[1] for p in pts])
    return out


def plot(stage: str, history: list[dict], path: Path) -> bool:
    """One PNG per stage, a panel per kind of curve. False when the stage logged nothing to draw."""
    data = curves(history)
    if not data:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(data), figsize=(4.2 * len(data), 3.2), squeeze=False)
    for ax, (panel, lines) in zip(axes[0], data.items()):
        for key, (xs, ys) in lines.items():
            ax.plot(xs, ys, marker="o" if len(xs) < 3 else None, markersize=4, label=key)
        ax.set_title(f"{stage}: {panel}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return True


def markdown(run_dir: Path, recipe: str | None, outcomes, plots: dict[str, str]) -> str:
    lines = [f"# {run_dir.name}: recipe {recipe or '(none)'}", "",
             "| stage | status | wall time | key metrics | output |", "|---|---|---|---|---|"]
    for o in outcomes:
        key = ", ".join(f"{k} {_fmt(v)}" for k, v in headline(o.stage, o.info.get("metrics", {})).items())
        lines.append(f"| {o.stage} | {o.status} | {o.info.get('wall_time_s', 0):.0f} s | {key} | `{o.path}` |")
    for o in outcomes:
        lines += ["", f"## {o.stage}", ""]
        parents = ", ".join(f"{p['stage']} (`{p['path']}`)" for p in o.info.get("parents", [])) or "the base model"
        lines += [f"From {parents}; {o.info.get('weights', '?')} weights; config hash `{o.info.get('config_hash')}`.", ""]
        if o.stage in plots:
            lines += [f"![{o.stage} training curves]({plots[o.stage]})", ""]
        results = Path(o.path) / handoff.RESULTS_MD  # the eval stage's table
        if results.is_file():
            lines += [results.read_text().rstrip(), ""]
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in o.info.get("metrics", {}).items()]
    return "\n".join(lines) + "\n"


def table(recipe: str | None, outcomes):
    from rich.table import Table

    t = Table(title=f"recipe {recipe}: stages")
    for col in ("stage", "status", "wall time", "key metrics"):
        t.add_column(col)
    for o in outcomes:
        key = "\n".join(f"{k} = {_fmt(v)}" for k, v in headline(o.stage, o.info.get("metrics", {})).items())
        t.add_row(o.stage, o.status, f"{o.info.get('wall_time_s', 0):.0f} s", key)
    return t


def report(run_dir: Path, recipe: str | None, outcomes) -> Path:
    """Write plots/<stage>.png and summary.md into run_dir; print the table. Returns summary.md."""
    from rich.console import Console

    plots = {}
    for o in outcomes:
        png = run_dir / PLOTS_DIR / f"{o.stage}.png"
        if plot(o.stage, handoff.read_history(o.path), png):
            plots[o.stage] = f"{PLOTS_DIR}/{png.name}"
    path = run_dir / SUMMARY_MD
    tmp = path.with_name(f".{SUMMARY_MD}.tmp")
    tmp.write_text(markdown(run_dir, recipe, outcomes, plots))
    tmp.replace(path)
    console = Console()
    console.print(table(recipe, outcomes))
    console.print(f"[bold]summary:[/bold] {path}")
    return path
