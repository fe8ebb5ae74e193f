"""Bad input, as a user would type it: each case is refused with align's message naming the key, file or
row and the fix, before any model loads, and the run's existing outputs and checkpoints stay byte-identical.

The command runs in this process (align.__main__.main with sys.argv), so the table costs no import per case.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest

from conftest import compose, run_cli, write_jsonl

FAST = ["train.max_steps=2", "data.max_rows=64", "train.save_steps=1000"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """runs/x: a complete sft, and a dpo interrupted at a committed checkpoint of another config."""
    from align.run import checkpointing, handoff
    from align.run.stage_run import HASH_FILE, IDENTITY_FILE
    from align.stages.sft import run

    root = tmp_path_factory.mktemp("bad_input") / "runs"
    run(compose(f"run.root={root}", "run.name=x", *FAST))
    ckpt = root / "x" / "dpo" / "checkpoints" / "checkpoint-3"
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"weights of step 3")
    checkpointing.commit(ckpt)
    (ckpt.parent / HASH_FILE).write_text("0123456789abcdef\n")
    other = handoff.identity(compose("stage=dpo", "stage.beta=0.3", "data.max_rows=64"))
    (ckpt.parent / IDENTITY_FILE).write_text(json.dumps(other, default=str))
    return root


def snapshot(root: Path) -> dict:
    """Every file under the run root and its content hash (lock files only say who ran last)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def files(where: Path) -> None:
    write_jsonl(where / "good.jsonl", [{"prompt": f"say {w}", "completion": w} for w in ("a", "b", "c", "d")])
    (where / "latin1.jsonl").write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "b"}\n')
    (where / "empty.jsonl").write_text("")
    (where / "broken.csv").write_text('prompt,completion\na,b\nc,d,e,f\n')
    (where / "not_a_folder").write_text("x")
    (where / "no_model_here").mkdir()


CASES = {  # id: (arguments, exit code, what the message must say)
    "batch_size_zero": (["train.batch_size=0"], 2, ["train.batch_size=0: must be >= 1",
                                                    "Fix: set train.batch_size to a value >= 1; the default is 4"]),
    "batch_size_negative": (["train.batch_size=-3"], 2, ["train.batch_size=-3: must be >= 1"]),
    "negative_lr": (["train.lr=-1"], 2, ["train.lr=-1.0: must be > 0"]),
    "negative_beta": (["stage=dpo", "stage.beta=-1"], 2, ["stage.beta=-1.0: must be > 0"]),
    "epochs_zero": (["train.epochs=0"], 2, ["train.epochs=0.0: must be > 0"]),
    "fraction_one": (["data.eval_fraction=1.0"], 2, ["data.eval_fraction=1.0: must be in [0, 1)"]),
    "bad_loss_name": (["stage=dpo", "stage.loss_type=[sigmoid,sigmoidd]"], 2, ["stage.loss_type=[sigmoid,sigmoidd]",
                                                                            "one of sigmoid, hinge"]),
    "weights_length": (["stage=dpo", "stage.loss_type=[sigmoid,sft]", "stage.loss_weights=[1.0]"], 2,
                       ["needs one weight per stage.loss_type entry"]),
    "rollout_not_multiple": (["stage=ppo", "stage.rollout_batch_size=30"], 2,
                             ["stage.rollout_batch_size=30 must be a multiple of train.batch_size x train.grad_accum"]),
    "dtype_name": (["model.dtype=bf17"], 2, ["model.dtype=bf17: must be one of auto, bf16, fp16, fp32"]),
    "misspelt_plus_key": (["+train.lrr=1e-4"], 2, ["train.lrr: no such key; did you mean train.lr?"]),
    "misspelt_stage_key": (["stage=dpo", "+stage.betta=0.2"], 2, ["stage.betta: no such key; did you mean stage.beta?"]),
    "retired_key": (["stage=ppo", "+stage.vf_coef=0.5"], 2, ["stage.vf_coef: removed", "stage.critic_max_grad_norm"]),
    "schema_as_stage": (["stage=sft_schema"], 2, ["stage=sft_schema: there is no stage named 'sft_schema'"]),
    # issue 32: an unknown option of the optional recipe group was ignored, and the default stage=sft trained
    "unknown_recipe": (["recipe=rlhf_pop"], 2, ["recipe=rlhf_pop: there is no recipe named 'rlhf_pop'; choose one of "
                                                "agent, demo, hpo_dpo, rlhf_dpo, rlhf_ppo, rlvr", "nothing was run"]),
    "unknown_stage": (["stage=sfft"], 2, ["stage=sfft: there is no stage named 'sfft'; choose one of sft, rm, dpo, "
                                          "kto, iterative_dpo, ppo, grpo, eval\n"]),
    "unknown_group_option": (["peft=lorra"], 2, ["peft=lorra: there is no peft named 'lorra'; choose one of lora, "
                                                 "none, qlora"]),
    "unknown_sweep_value": (["-m", "recipe=demo,rlhf_dpx"], 2, ["recipe=rlhf_dpx: there is no recipe named"]),
    "run_name_climbs_out": (["run.name=../../x"], 2, ["run.name='../../x': a run name is one folder inside run.root",
                                                      "Fix: run.name=my_run"]),
    "run_name_with_separator": (["run.name=a/b"], 2, ["run.name='a/b': a run name is one folder"]),
    "kl_in_reward_without_reinforce_pp": (["stage=grpo", "stage.beta=0.1", "stage.kl_in=reward"], 2,
                                          ["stage.kl_in=reward with stage.advantage=grpo", "Fix: stage.kl_in=loss"]),
    "non_utf8_row": (["data.train=latin1.jsonl"], 2, ["latin1.jsonl, row 2: not valid UTF-8 (byte 0xe9", "save the file as UTF-8"]),
    "empty_file": (["data.train=empty.jsonl"], 2, ["empty.jsonl: no usable training rows", "the file is empty"]),
    "malformed_csv": (["data.train=broken.csv"], 2, ["broken.csv: cannot be read as CSV", "line 3", "header row"]),
    "missing_data_file": (["data.train=nope.jsonl"], 2, ["nope.jsonl: file not found"]),
    "missing_model_dir": (["model.name_or_path=./models/qwen"], 2, ["model.name_or_path=./models/qwen: no such directory"]),
    "folder_without_model": (["model.name_or_path=no_model_here"], 2, ["no_model_here: the folder has no config.json"]),
    "hub_name_offline": (["model.name_or_path=Qwen/Qwen2.5-0.5B-Instruct"], 2, ["HF_HUB_OFFLINE is set", "local copy"]),
    "root_not_writable": (["run.root=not_a_folder"], 2, ["run.root=not_a_folder: cannot write", "Fix: set run.root"]),
    "ppo_without_rm": (["stage=ppo", "run.name=fresh", "run.root=runs"], 2, ["ppo needs a reward model", "stage=rm"]),
    "interrupted_other_config": (["stage=dpo", "data.max_rows=64"], 2,
                                 ["holds an interrupted run's checkpoint (checkpoint-3) trained with another config",
                                  "stage.beta: 0.3 -> null", "run.force=true", "Nothing was changed"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_before_loading_and_changes_nothing(case, trained, tmp_path, monkeypatch, caplog, capsys):
    import importlib

    from transformers.models.auto.auto_factory import _BaseAutoModelClass

    for name in ("sft", "rm", "dpo", "ppo", "eval"):  # imported before the patch: no module keeps the stand-in
        importlib.import_module(f"align.stages.{name}")
    args, code, says = CASES[case]
    shutil.copytree(trained, tmp_path / "runs", symlinks=True)
    files(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path / "runs")

    def no_loading(*a, **k):
        raise AssertionError(f"{case}: a model was loaded before the refusal")

    monkeypatch.setattr(_BaseAutoModelClass, "from_pretrained", classmethod(no_loading))
    defaults = [a for a in ("run.root=runs", "run.name=x") if a.split("=")[0] not in {x.split("=")[0] for x in args}]
    with caplog.at_level("INFO", logger="align"):
        rc = run_cli([*defaults, *args], monkeypatch)
    text = caplog.text + capsys.readouterr().err
    assert rc == code, (case, text[-2000:])
    for part in says:
        assert part in text, (case, part, text[-2000:])
    assert "Traceback" not in text
    assert "_schema" not in text.replace("stage=sft_schema", "").replace("'sft_schema'", "")  # no internal names
    assert snapshot(tmp_path / "runs") == before, case
    assert not (tmp_path / "runs" / "fresh").exists()  # a stage stopped before it began leaves no folder


def test_a_model_folder_whose_weights_do_not_load_is_named_with_the_file_and_the_reason(trained, tmp_path, monkeypatch,
                                                                                         caplog, capsys):
    """A truncated model.safetensors (an interrupted copy): align's message names the folder, the file and the
    reason, exit 2, no traceback, and the stage leaves no folder behind."""
    from align.models.tiny import tiny_model_dir

    shutil.copytree(tiny_model_dir(), tmp_path / "my_model")
    weights = tmp_path / "my_model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    monkeypatch.chdir(tmp_path)
    with caplog.at_level("INFO", logger="align"):
        rc = run_cli(["run.root=runs", "run.name=fresh", "model.name_or_path=my_model", *FAST], monkeypatch)
    text = caplog.text + capsys.readouterr().err
    assert rc == 2, text[-2000:]
    assert "my_model: the model's weights do not load: model.safetensors is unreadable (SafetensorError" in text
    assert "Fix: copy or download that file again" in text and "Traceback" not in text
    assert not (tmp_path / "runs" / "fresh").exists()


def test_help_is_align_s_own_and_imports_no_torch():
    import subprocess

    code = ("import sys, runpy; sys.argv = ['align', '--help']; runpy.run_module('align', run_name='__main__'); "
            "print('torch loaded' if 'torch' in sys.modules else 'no torch')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("align: post-training for causal language models")
    assert "stages:   sft, rm, dpo, kto, iterative_dpo, ppo, grpo, eval" in out.stdout and "recipes:  agent, demo" in out.stdout
    assert "model:" in out.stdout and "qwen2_5_0_5b" in out.stdout
    assert "_schema" not in out.stdout and "???" not in out.stdout and "powered by Hydra" not in out.stdout
    assert out.stdout.rstrip().endswith("no torch")


def test_a_partial_recipe_runs_without_its_objective_and_a_sweep_refuses_it_before_training(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    base = ["recipe=rlhf_dpo", "pipeline.stages=[sft]", "model=tiny", "peft=none", "run.root=runs",
            "sft.train.max_steps=1", "data.max_rows=16", "train.max_length=64"]
    with caplog.at_level("INFO", logger="align"):
        assert run_cli(base, monkeypatch) == 0
    assert "pipeline.objective=dpo.eval_accuracy is not computed: this run does not include dpo" in caplog.text
    assert (tmp_path / "runs" / "rlhf_dpo" / "sft" / "stage.json").is_file()
    caplog.clear()
    with caplog.at_level("INFO", logger="align"):
        assert run_cli(["-m", *base, "run.name=sweep", "sft.train.lr=1e-3,2e-3"], monkeypatch) == 2
    assert "'dpo' is not among pipeline.stages" in caplog.text
    assert not list((tmp_path / "runs").glob("sweep/**/stage.json"))


def test_a_hub_name_without_network_fails_at_once_with_the_fix(monkeypatch):
    """No HF_HUB_OFFLINE, no cached copy, the hub unreachable (a closed local port stands in for no network):
    one probe, no retries, align's message."""
    import time

    import huggingface_hub

    from align.run import preflight
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    start = time.monotonic()
    problem = preflight.model_problem("Qwen/Qwen2.5-0.5B-Instruct")
    assert "the hub cannot be reached" in problem and "local directory" in problem
    assert time.monotonic() - start < 20  # the loaders' own retries took 25-60 s
