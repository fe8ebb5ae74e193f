"""The combinations align refuses, before loading a model, with a message that says what to change."""

from __future__ import annotations

import pytest

from conftest import compose
from test_cli import align

STAGES = ("sft", "rm", "dpo", "ppo")
ZERO = ("none", "zero1", "zero2", "zero3", "zero3_offload")
PEFT = ("none", "lora", "qlora")


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_zero_and_weights_combination_is_accepted(stage):
    from align.config import rules as supported
    for zero in ZERO:
        for peft in PEFT:
            assert supported.problems(compose(f"stage={stage}", f"deepspeed={zero}", f"peft={peft}")) == [], (zero, peft)


def test_dpo_precompute_under_zero3_is_refused_and_under_zero2_accepted():
    from align.config import rules as supported
    for zero in ("zero3", "zero3_offload"):
        with pytest.raises(supported.Unsupported) as e:
            supported.check(compose("stage=dpo", f"deepspeed={zero}", "stage.precompute_ref_logps=true"))
        assert "stage.precompute_ref_logps=true does not work under ZeRO-3" in str(e.value)
        assert "deepspeed=zero2" in str(e.value) and "stage.precompute_ref_logps=false" in str(e.value)
    assert supported.problems(compose("stage=dpo", "deepspeed=zero2", "stage.precompute_ref_logps=true")) == []


def test_every_problem_is_listed_at_once():
    from align.config import rules as supported
    cfg = compose("stage=ppo", "peft=qlora", "peft.quant.compute_dtype=bfloat16", "peft.quant.bits=3",
                  "stage.frozen_device=gpu", "deepspeed=zero2", "deepspeed.offload_param=cpu")
    found = supported.problems(cfg)
    assert [p.split(":")[0] for p in found] == [  # each key once, with its value
        "peft.quant.bits=3",
        "peft.quant.compute_dtype=bfloat16",
        "stage.frozen_device=gpu",
        "deepspeed.offload_param needs ZeRO-3 (deepspeed=zero3_offload); zero_stage is 2",
    ]
    assert "must be one of auto, bf16, fp16, fp32" in found[1] and "the default is auto" in found[1]


def test_the_command_line_refuses_before_loading_and_writes_nothing(tmp_path):
    out = align("stage=dpo", "deepspeed=zero3", "stage.precompute_ref_logps=true", cwd=tmp_path, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "stage=dpo: this configuration is not supported" in out.stderr
    assert "use deepspeed=zero2" in out.stderr
    assert "Loading weights" not in out.stderr and not (tmp_path / "runs" / "demo" / "dpo").exists()


def test_a_recipe_is_checked_whole_before_its_first_stage_trains(tmp_path):
    out = align("recipe=demo", "deepspeed=zero3", "dpo.precompute_ref_logps=true", cwd=tmp_path, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "stage=dpo: this configuration is not supported" in out.stderr
    assert not (tmp_path / "runs" / "demo" / "sft").exists()  # sft (the first stage) never started
