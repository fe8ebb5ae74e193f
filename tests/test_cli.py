"""The command line as a user types it (subprocesses: each pays the import cost, so only a few)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO, write_jsonl, child_env


def align(*args, cwd, timeout=300):
    env = child_env()
    return subprocess.run([sys.executable, "-m", "align", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_sft_from_the_command_line_on_user_data(tmp_path):
    rows = [{"instruction": f"reverse: {w}", "output": w[::-1]} for w in ("abcd", "wxyz", "hello", "tiny")] * 8
    write_jsonl(tmp_path / "mine.jsonl", rows)
    out = align("stage=sft", "run.name=cli", "data.train=mine.jsonl", "data.eval_fraction=0.25",
                "train.max_steps=4", "train.batch_size=4", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "sft output:" in out.stdout and "runs/cli/sft" in out.stdout
    record = json.loads((tmp_path / "runs/cli/sft/stage.json").read_text())
    assert record["metrics"]["data/train_rows"] == 24 and record["metrics"]["data/eval_rows"] == 8
    assert not (tmp_path / "outputs").exists()  # Hydra leaves no stray output dirs


def test_bad_row_stops_before_training_with_file_and_row(tmp_path):
    write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "completion": "c"}, '{"prompt": "p", "completion"'])
    out = align("data.train=bad.jsonl", "train.max_steps=2", cwd=tmp_path)
    assert out.returncode == 2
    assert "bad.jsonl, row 2: invalid JSON" in out.stderr and "data.on_error=skip" in out.stderr
    assert not (tmp_path / "runs/demo/sft/stage.json").exists()


def test_package_runs_outside_the_repo(tmp_path):
    out = align("--cfg", "job", cwd=tmp_path, timeout=120)
    assert out.returncode == 0 and "name_or_path: builtin:tiny" in out.stdout
    assert str(REPO) not in out.stdout
    own = align("stage=sft", "model=qwen2_5_0_5b", "data.train=mine.jsonl", "--cfg", "job", cwd=tmp_path, timeout=120)
    assert own.returncode == 0 and "max_length: 2048" in own.stdout and "max_length: 64" not in own.stdout


def test_third_party_noise_is_dropped_by_its_exact_message_and_nothing_else():
    """bitsandbytes 0.50 on a CPU with AVX512-BF16 logs at import that it failed to fetch a kernel from the hub (a
    user reads it as an error). align drops that record by its exact format string — the installed bitsandbytes'
    own text, word for word — and lets every other message of the same logger through."""
    import importlib.util
    import io
    import logging
    from pathlib import Path

    from align.__main__ import NOISE, _quiet_third_party

    _quiet_third_party()
    _quiet_third_party()  # idempotent: one filter
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logging.getLogger().addHandler(handler)
    try:
        for name, messages in NOISE.items():
            source = Path(importlib.util.find_spec(name).origin).read_text()
            logger = logging.getLogger(name)
            assert len(logger.filters) == 1
            for message in messages:
                assert message in source, (name, message)  # the filter follows bitsandbytes' wording
                logger.warning(message, "Download the kernel while online first")
            logger.warning("Failed to load something else: %s", "kept")
    finally:
        logging.getLogger().removeHandler(handler)
    assert stream.getvalue() == "Failed to load something else: kept\n"
