"""Two nodes, simulated on this machine: launch/slurm.sbatch as SLURM runs it, with `scontrol` and `srun`
replaced by stubs that name two nodes and start the per-node command twice (SLURM_NODEID 0 and 1). Each
"node" runs its own DeepSpeed launcher (--hostfile --no_ssh --node_rank --master_addr --master_port), with
one rank each, so the world of 2 is assembled across launchers exactly as on two machines."""

from __future__ import annotations

import os
import stat
import subprocess

from conftest import REPO
from test_launch import free_port, launch_env, stage_record

SCONTROL = """#!/bin/bash
[ "$1 $2" = "show hostnames" ] || exit 1
printf 'localhost\\n127.0.0.1\\n'  # two names of this machine: the rendezvous resolves
"""
# srun --ntasks-per-node=1 ... CMD: CMD once per node, at the same time, like SLURM on two nodes
SRUN = """#!/bin/bash
while [[ "$1" == --* ]]; do echo "$1" >> "$SRUN_LOG"; shift; done
SLURM_NODEID=0 "$@" & a=$!
SLURM_NODEID=1 "$@" & b=$!
wait $a; ra=$?
wait $b; rb=$?
exit $(( ra != 0 ? ra : rb ))
"""


def stub(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_slurm_script_runs_a_stage_across_two_nodes(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub(bin_dir / "scontrol", SCONTROL)
    stub(bin_dir / "srun", SRUN)
    runs = tmp_path / "runs"
    env = launch_env()
    env.update(PATH=f"{bin_dir}:{env['PATH']}", SRUN_LOG=str(tmp_path / "srun.log"), SLURM_JOB_ID="4242",
               SLURM_JOB_NODELIST="node-[1-2]", SLURM_SUBMIT_DIR=str(tmp_path), ALIGN_HOME=str(REPO),
               ALIGN_GPUS_PER_NODE="1", MASTER_PORT=str(free_port()))
    out = subprocess.run(["bash", str(REPO / "launch/slurm.sbatch"), "sft", "deepspeed=zero2", f"run.root={runs}",
                          "train.max_steps=3", "train.batch_size=4", "data.max_rows=64"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=480)
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    assert (tmp_path / ".align-hostfile-4242").read_text() == "localhost slots=1\n127.0.0.1 slots=1\n"
    assert f"2 nodes x 1 ranks, rendezvous localhost:{env['MASTER_PORT']}" in out.stdout
    record = stage_record(runs, stage="sft")
    assert record["distributed"] == {"world_size": 2, "zero_stage": 2}  # one world across the two launchers
    assert sorted(p.name for p in (runs / "demo").iterdir()) == ["sft"]  # both nodes resolved the same folder
    assert "--ntasks-per-node=1" in (tmp_path / "srun.log").read_text().split()


def test_slurm_script_names_the_launch_files_when_the_stage_is_wrong(tmp_path):
    env = {**os.environ, "SLURM_SUBMIT_DIR": str(tmp_path), "ALIGN_HOME": str(REPO)}
    out = subprocess.run(["bash", str(REPO / "launch/slurm.sbatch"), "sfft"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "no launch file" in out.stderr and "dpo grpo iterative_dpo kto ppo recipe rm sft stage" in out.stderr
