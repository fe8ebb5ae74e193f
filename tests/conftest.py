"""Shared fixtures: configs composed in-process (no subprocess per case), a tiny-model cache per session."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.pop("WANDB_API_KEY", None)
# One compute thread per test process: two xdist workers with a thread per core each would
# oversubscribe the cores, and pinned values (which depend on float summation order) hold however
# the tests are run.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]

# the vLLM tests run in the environment that has vLLM (README); elsewhere the file is not collected. There, an
# install that lost vLLM collects nothing, and `pytest -m vllm tests/test_vllm*.py` fails (no tests ran)
if importlib.util.find_spec("vllm") is None:
    collect_ignore = ["test_vllm.py", "test_vllm_ranks.py"]

# `-n 2 --dist loadfile` hands out files in collection order once xdist's own reordering (by number of tests) is
# off: the longest files go first (measured times, longest first), so the short ones fill in at the end instead of
# the demo (7-8 minutes) or the zoo (6) starting last and running alone (measured: 3 minutes of one idle worker)
LONGEST_FIRST = ("test_demo.py", "test_zoo.py", "test_agent.py", "test_launch.py", "test_zero_matrix.py",
                 "test_multirank_reliability.py", "test_ppo.py", "test_grpo.py", "test_reliability.py", "test_rm.py",
                 "test_families.py", "test_recipes.py", "test_dpo.py", "test_kto.py", "test_bf16.py",
                 "test_vllm_ranks.py", "test_vllm.py")


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    first = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))  # stable: the rest keeps its order


def child_env(**extra: str) -> dict:
    """Environment for a subprocess run of align: offline W&B, and without WANDB_SERVICE, which W&B sets
    in a process that has used it (an in-process test did) and which would make the child talk to this
    process's W&B service instead of starting its own."""
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    return {**env, "WANDB_MODE": "offline", **extra}


def compose(*overrides: str):
    """The config `python -m align <overrides>` would run with."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from align.config.paths import config_dir
    from align.config.recipes import register

    register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


def run_cli(args: list[str], monkeypatch) -> int:
    """`python -m align <args>` in this process (no import cost per call): its exit code."""
    import sys

    from align.__main__ import main

    monkeypatch.setattr(sys, "argv", ["align", *args])
    try:
        main()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0


@pytest.fixture(scope="session", autouse=True)
def _quiet():
    import datasets

    datasets.disable_progress_bars()


@pytest.fixture
def runs(tmp_path) -> Path:
    return tmp_path / "runs"


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from transformers import AutoTokenizer

    from align.models.tiny import TOKENIZER_DIR

    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)
