"""launch/<stage>.sh under bash and under the DeepSpeed launcher: real ranks over gloo on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, child_env

LAUNCH_FILES = sorted((REPO / "launch").glob("*.sh"))


def deepspeed_bin() -> str:
    local = Path(sys.executable).parent / "deepspeed"
    return str(local) if local.exists() else "deepspeed"


def launch_env(**extra: str) -> dict:
    env = child_env(PYTHON=sys.executable, DS_ACCELERATOR="cpu", **extra)
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_own_port(cmd: list[str]) -> list[str]:
    """A launcher command with a free --master_port: two xdist workers may launch at once, and DeepSpeed's
    default port (29500) would be taken by the first."""
    if "--num_gpus" not in cmd or any(a.startswith("--master_port") for a in cmd):
        return cmd
    at = cmd.index("--num_gpus") + 2
    return [*cmd[:at], f"--master_port={free_port()}", *cmd[at:]]


def launch(cmd: list[str], cwd: Path, timeout: int = 480, returncode: int = 0,
           **env: str) -> subprocess.CompletedProcess:
    cmd = with_own_port(cmd)
    out = subprocess.run(cmd, cwd=cwd, env=launch_env(**env), capture_output=True, text=True, timeout=timeout)
    assert out.returncode == returncode, (out.returncode, out.stdout[-4000:], out.stderr[-4000:])
    port = next((a.split("=", 1)[1] for a in cmd if a.startswith("--master_port=")), None)
    if port is not None:  # DeepSpeed's CPU all-reduce buffers (66 MB a rank) do not outlive the run
        assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*")), port
    return out


def test_split_launcher_options_from_overrides():
    from align.launch import split_launcher_args, stage_argv

    argv = ["--num_gpus", "2", "deepspeed=zero3", "--hostfile=hosts", "--force_multi", "-H", "h2", "peft=lora"]
    assert split_launcher_args(argv) == (
        ["--num_gpus", "2", "--hostfile=hosts", "--force_multi", "-H", "h2"], ["deepspeed=zero3", "peft=lora"])
    assert stage_argv("dpo", ["peft=lora"]) == ["stage=dpo", "deepspeed=zero2", "peft=lora"]
    assert stage_argv("dpo", ["deepspeed=zero3"]) == ["stage=dpo", "deepspeed=zero3"]
    with pytest.raises(SystemExit, match="launch/dpo.sh runs stage=dpo"):
        stage_argv("dpo", ["stage=sft"])
    assert stage_argv("recipe", ["recipe=demo"]) == ["deepspeed=zero2", "recipe=demo"]
    with pytest.raises(SystemExit, match="needs the recipe to run: recipe=NAME"):
        stage_argv("recipe", ["train.max_steps=2"])
    assert stage_argv("stage", ["stage=grpo", "peft=lora"]) == ["deepspeed=zero2", "stage=grpo", "peft=lora"]
    with pytest.raises(SystemExit, match="launch/stage.sh needs the stage to run: stage=NAME"):
        stage_argv("stage", ["peft=lora"])
    with pytest.raises(SystemExit, match="--num_gpus needs a value"):
        split_launcher_args(["--num_gpus"])


@pytest.mark.parametrize("path", LAUNCH_FILES, ids=lambda p: p.name)
def test_launch_files_are_valid_bash_and_python(path):
    compile(path.read_text(), str(path), "exec")  # what every rank runs
    # bash executes line 1 only (exec): it re-runs the file with Python, forwarding every argument
    env = {**os.environ, "PYTHON": "echo"}
    out = subprocess.run(["bash", str(path), "--num_gpus", "2", "a=1", "b=x y"], env=env, capture_output=True,
                         text=True)
    assert out.returncode == 0 and out.stdout == f"{path} --from-bash --num_gpus 2 a=1 b=x y\n"
    assert os.access(path, os.X_OK)
    # one launcher: launch/<stage>.sh are links to stage.sh, which runs the stage it is called by
    assert path.name == "stage.sh" or os.readlink(path) == "stage.sh"
    assert "main(Path(__file__).stem, __file__)" in path.read_text()


def stage_record(runs: Path, name: str = "demo", stage: str = "dpo") -> dict:
    return json.loads((runs / name / stage / "stage.json").read_text())


def test_literal_deepspeed_launch_runs(tmp_path):
    runs = tmp_path / "runs"
    launch([deepspeed_bin(), "launch/dpo.sh", "train.max_steps=2", f"run.root={runs}", "data.max_rows=100"],
           cwd=REPO)
    assert stage_record(runs)["distributed"] == {"world_size": 1, "zero_stage": 2}


def test_two_ranks_zero2_ppo(tmp_path):
    """PPO's own loop under DeepSpeed: actor and critic are ZeRO-2 engines, stats averaged over ranks."""
    from test_ppo import run_stage

    runs = tmp_path / "runs"
    run_stage("sft", runs, "train.max_steps=20", "train.batch_size=32")
    run_stage("rm", runs, "train.max_steps=10", "train.batch_size=32")
    launch(["bash", str(REPO / "launch/ppo.sh"), "--num_gpus", "2", f"run.root={runs}", "train.max_steps=2",
            "train.batch_size=8", "stage.rollout_batch_size=8", "stage.ppo_epochs=1", "stage.eval_prompts=16",
            "stage.max_new_tokens=8"], cwd=tmp_path)
    record = stage_record(runs, stage="ppo")
    assert record["distributed"] == {"world_size": 2, "zero_stage": 2}
    assert record["metrics"]["first_objective/kl"] == pytest.approx(0.0, abs=1e-5)
    assert (runs / "demo" / "ppo" / "critic" / "model.safetensors").is_file()


def test_two_ranks_run_a_recipe_and_agree_on_the_cache(tmp_path):
    """launch/recipe.sh: both ranks walk sft -> dpo and commit one output per stage; on the re-run with a changed DPO
    key both skip sft (rank 0 decides, the others follow) and re-train dpo only."""
    from transformers import AutoModelForCausalLM

    runs = tmp_path / "runs"
    args = ["bash", str(REPO / "launch/recipe.sh"), "--num_gpus", "2", "recipe=demo", "pipeline.stages=[sft,dpo]",
            f"run.root={runs}", "train.max_steps=2", "data.max_rows=100", "dpo.loss_type=sigmoid"]
    first = launch(args, cwd=tmp_path)
    assert first.stdout.count("exits successfully") == 2
    ids = {s: stage_record(runs, stage=s)["output_id"] for s in ("sft", "dpo")}
    for stage in ("sft", "dpo"):
        assert stage_record(runs, stage=stage)["distributed"] == {"world_size": 2, "zero_stage": 2}
        hidden = sorted(p.name for p in (runs / "demo" / stage).iterdir() if p.name.startswith("."))
        assert hidden == [".lock"]  # no staging leftovers; the lock file stays (its flock went with the process)
    # both ranks' DPO starts at its reference (the SFT): the sigmoid loss is log 2
    assert stage_record(runs, stage="dpo")["metrics"]["first_loss"] == pytest.approx(0.693147, abs=1e-5)
    AutoModelForCausalLM.from_pretrained(runs / "demo" / "dpo" / "model")  # plain transformers loads it
    second = launch([*args, "dpo.beta=0.2"], cwd=tmp_path)
    assert "sft: up to date" in second.stdout + second.stderr and second.stdout.count("exits successfully") == 2
    assert stage_record(runs, stage="sft")["output_id"] == ids["sft"]
    assert stage_record(runs, stage="dpo")["output_id"] != ids["dpo"]
    assert (runs / "demo" / "summary.md").is_file()


def test_two_ranks_zero2_resume_equals_the_uninterrupted_run(tmp_path):
    """A crash right after checkpoint-3 of a 2-rank ZeRO-2 SFT (later checkpoint and output removed):
    the same command resumes from checkpoint-3 and logs the same losses for steps 4-6."""
    import shutil

    from align.run import checkpointing
    from align.run.handoff import read_history

    runs = tmp_path / "runs"
    args = ["bash", str(REPO / "launch/sft.sh"), "--num_gpus", "2", "deepspeed=zero2", f"run.root={runs}",
            "train.max_steps=6", "train.save_steps=3", "train.logging_steps=1", "data.max_rows=128",
            "train.batch_size=8"]
    launch(args, cwd=tmp_path)
    out = runs / "demo" / "sft"
    whole = {h["step"]: h["loss"] for h in read_history(out) if "loss" in h}
    assert [p.name for p in checkpointing.checkpoints(out / "checkpoints")] == ["checkpoint-3", "checkpoint-6"]
    shutil.rmtree(out / "checkpoints" / "checkpoint-6")
    for name in ("stage.json", "history.jsonl"):
        (out / name).unlink()
    again = launch(args, cwd=tmp_path)
    assert "resuming from" in again.stdout + again.stderr
    got = {h["step"]: h["loss"] for h in read_history(out) if "loss" in h}
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert got[step] == pytest.approx(whole[step], rel=1e-5), step



def test_a_refusal_on_two_ranks_is_printed_once(tmp_path):
    """Every rank meets a bad value alike; align's message comes once (rank 0), not once per rank, and no
    traceback."""
    out = launch([deepspeed_bin(), "--num_gpus", "2", str(REPO / "launch/sft.sh"), "train.batch_size=0",
                  f"run.root={tmp_path / 'runs'}"], cwd=tmp_path, returncode=2)
    text = out.stdout + out.stderr
    assert text.count("train.batch_size=0: must be >= 1") == 1, text[-3000:]
    assert "Traceback" not in text and "Error executing job" not in text
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("stage.json"))
