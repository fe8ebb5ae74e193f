"""The wheel users get from `pip install .` (not `-e`): every file of align/, conf/ and recipes/ is in it, and
`python -m align` runs a stage from it in a fresh environment (issue 32: align.rewards was missing from the
hand-written package list, so the wheel failed at the first `from align.rewards import ...`; and the recipes
shipped as the package align.recipes hid the module of that name, now align/config/recipes.py). The installed
package is under 1 MB: the tasks' data files are generated on first use, not shipped (issue 33)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from conftest import REPO, child_env


def repo_files() -> set[str]:
    """The project's files as the wheel names them (align/..., align/conf/..., align/recipe_files/...: recipes
    ship as align/recipe_files, since a package align/recipes once shadowed the module of that name)."""
    out = set()
    for top, prefix in (("align", "align"), ("conf", "align/conf"), ("recipes", "align/recipe_files")):
        for p in (REPO / top).rglob("*"):
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc":
                out.add(f"{prefix}/{p.relative_to(REPO / top).as_posix()}")
    return out


def test_the_wheel_holds_every_file_and_runs_a_stage_in_a_fresh_environment(tmp_path):
    dist, source = tmp_path / "dist", tmp_path / "source"  # a clean copy: setuptools reuses a stale build/ folder
    for name in ("align", "conf", "recipes"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(source)],
                   check=True, capture_output=True, text=True, timeout=600)
    (wheel,) = dist.glob("align-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(repo_files() - names)
    assert not missing, missing

    # a fresh environment with the wheel installed, and this environment's third-party packages beside it (not
    # its editable align: a .pth line adds a folder but runs none of the .pth files in it)
    env_dir = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, text=True, timeout=300)
    (site / "_parent_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = sum(f.stat().st_size for f in (site / "align").rglob("*") if f.is_file() and "__pycache__" not in f.parts)
    assert installed < 2**20, f"the installed package is {installed / 2**20:.2f} MB"
    assert not [n for n in names if n.endswith(".jsonl")]  # no data ships: the tasks write theirs on first use

    fresh = {k: v for k, v in child_env().items() if k != "PYTHONPATH"}  # nothing of this checkout on the path

    def align(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(python), "-m", "align", *args], cwd=tmp_path, env=fresh, capture_output=True,
                              text=True, timeout=600)

    where = subprocess.run([str(python), "-c", "import align.rewards, align; print(align.__file__)"], cwd=tmp_path,
                           capture_output=True, text=True, env=fresh)
    assert where.returncode == 0 and where.stdout.startswith(str(site)), (where.stdout, where.stderr[-2000:])
    help_ = align("--help")
    assert help_.returncode == 0 and "recipes:  agent, demo" in help_.stdout, help_.stdout
    recipe = align("recipe=rlvr", "--cfg", "job")
    assert recipe.returncode == 0 and "- grpo" in recipe.stdout, recipe.stderr[-2000:]
    run = align("stage=grpo", "train.max_steps=2", "stage.rollout_batch_size=2", "stage.group_size=2",
                "train.batch_size=4", "stage.eval_prompts=4", "stage.max_new_tokens=4", f"run.root={tmp_path / 'runs'}")
    assert run.returncode == 0, run.stderr[-4000:]
    assert (tmp_path / "runs" / "demo" / "grpo" / "stage.json").is_file()  # on the demo's files, generated
