"""`python -m align plan`: shapes counted exactly (formula = transformers on the meta device), model states equal to
DeepSpeed's own estimators to the byte, a 2-layer model under ZeRO-3 on 4 GPUs with LoRA by hand, the command on a
7B recipe with no model on disk, the overrides that make a stage fit, and the preflight's warning and refusal."""

from __future__ import annotations

import json

import pytest

from conftest import compose, run_cli

TWO_LAYERS = {"model_type": "llama", "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 32, "tie_word_embeddings": False}


@pytest.mark.parametrize("name", ["Qwen/Qwen2.5-7B-Instruct", "meta-llama/Llama-3.1-8B", "google/gemma-2-2b-it",
                                  "mistralai/Mistral-7B-Instruct-v0.3", "Qwen/Qwen2.5-0.5B-Instruct"])
def test_the_formula_counts_what_transformers_builds(name):
    from align.plan.shapes import config_dict, formula_shape, meta_shape

    small = {**config_dict(name), "num_hidden_layers": 2, "vocab_size": 1000}
    f, m = formula_shape(name, small), meta_shape(name, small)
    assert (f.params, f.layer_params, f.linear_params, f.lora_dims) == (m.params, m.layer_params, m.linear_params,
                                                                         m.lora_dims)


def test_shipped_shapes_have_their_published_sizes():
    from align.plan.shapes import shape_of

    sizes = {name: shape_of(name).params for name in ("Qwen/Qwen2.5-7B-Instruct", "meta-llama/Llama-3.1-8B",
                                                      "meta-llama/Llama-2-70b-hf", "google/gemma-2-2b-it")}
    assert sizes == {"Qwen/Qwen2.5-7B-Instruct": 7_615_616_512, "meta-llama/Llama-3.1-8B": 8_030_261_248,
                     "meta-llama/Llama-2-70b-hf": 68_976_648_192, "google/gemma-2-2b-it": 2_614_341_888}


@pytest.mark.parametrize("zero,offload_optimizer,offload_param", [(2, False, False), (2, True, False),
                                                                  (3, False, False), (3, True, False),
                                                                  (3, True, True)])
@pytest.mark.parametrize("gpus", [1, 8])
def test_full_fine_tuning_model_states_equal_deepspeeds_estimators(zero, offload_optimizer, offload_param, gpus):
    from align.plan import memory
    from align.plan.shapes import shape_of

    for name in ("Qwen/Qwen2.5-7B-Instruct", "meta-llama/Llama-2-70b-hf"):
        s = shape_of(name)
        ours = memory.weight_bytes(2 * s.params, s.largest_layer_params, zero, gpus, offload_param) + \
            memory.trained_states(s.params, zero, gpus, offload_optimizer, 2)
        assert int(ours) == memory.deepspeed_model_states(s, zero, gpus, offload_optimizer, offload_param)


def test_a_two_layer_model_under_zero3_on_four_gpus_with_lora_by_hand(tmp_path):
    from align.plan.shapes import shape_of
    from align.plan.stage_plan import plan_stage

    (tmp_path / "config.json").write_text(json.dumps(TWO_LAYERS))
    s = shape_of(str(tmp_path))
    # per layer: q, k, v, o 8x8 = 64 each, gate/up 8x16, down 16x8 = 128 each, two norms of 8: 656
    assert (s.layer_params, s.params) == (656, 2 * 32 * 8 + 2 * 656 + 8)  # embeddings, lm_head, layers, final norm
    assert s.lora_params(2) == 2 * (4 * 2 * 16 + 3 * 2 * 24)  # r (in + out) per linear: 544
    cfg = compose("stage=sft", f"model.name_or_path={tmp_path}", "peft=lora", "peft.r=2", "deepspeed=zero3",
                  "model.dtype=bf16", "train.batch_size=2", "train.max_length=4")
    rows = dict(plan_stage(cfg, s, gpus=4, gpu_memory=None).rows)
    assert rows["policy weights"] == 4 * 656 + 2 * 1832 / 4  # the largest layer gathered, the rest sharded
    assert rows["policy LoRA adapter (fp32) + gradients + optimizer"] == 544 * 4 + 16 * 544 / 4
    # 8 tokens; per token and layer 4h + 3ad + 3kvd + 4i = 32 + 24 + 24 + 64 = 144 values of 2 bytes, and LoRA's:
    # 7 adapters' A outputs (r = 2 values of 2 bytes each) and, with dropout, their inputs (6 x 8 + 16 = 64 values)
    # dropped out (2 bytes) with their masks (1 byte)
    lora = 8 * (7 * 2 * 2 + 64 * 3)
    assert rows["activations (2 x 4 tokens, no checkpointing)"] == 2 * (144 * 8 * 2 + lora)
    assert rows["logits (whole micro-batch, fp32)"] == 3 * 4 * 8 * 32
    checkpointed = compose("stage=sft", f"model.name_or_path={tmp_path}", "peft=lora", "peft.r=2", "deepspeed=zero3",
                           "model.dtype=bf16", "train.batch_size=2", "train.max_length=4",
                           "model.gradient_checkpointing=true")
    rows = dict(plan_stage(checkpointed, s, gpus=4, gpu_memory=None).rows)
    assert rows["activations (2 x 4 tokens, activation checkpointing)"] == 2 * 8 * 8 * 2 + 144 * 8 * 2 + lora


def test_ppo_holds_the_actors_and_the_critics_activations_together(tmp_path):
    """PPO's update runs the actor's and the critic's forward passes before either backward (align/stages/ppo.py
    _update), so both models' activations are alive at once; the plan counted only one set, and a medium model's PPO
    step on the CPU grew by about twice what it said. Under checkpointing each keeps its layer inputs, and one layer
    at a time is recomputed."""
    from align.plan.shapes import shape_of
    from align.plan.stage_plan import plan_stage

    (tmp_path / "config.json").write_text(json.dumps(TWO_LAYERS))
    s = shape_of(str(tmp_path))
    common = ("stage=ppo", f"model.name_or_path={tmp_path}", "peft=lora", "peft.r=2", "peft.dropout=0",
              "model.dtype=bf16", "train.batch_size=2", "stage.max_prompt_length=3", "stage.max_new_tokens=1")
    lora = 8 * 7 * 2 * 2  # 8 tokens, 7 adapters' A outputs of r = 2 values (no dropout)
    rows = dict(plan_stage(compose(*common), s, gpus=1, gpu_memory=None).rows)
    for role in ("actor", "critic"):
        assert rows[f"{role} activations (2 x 4 tokens, no checkpointing)"] == 2 * (144 * 8 * 2 + lora)
    rows = dict(plan_stage(compose(*common, "model.gradient_checkpointing=true"), s, 1, None).rows)
    assert rows["actor activations (2 x 4 tokens, activation checkpointing)"] == 2 * 8 * 8 * 2 + 144 * 8 * 2 + lora
    assert rows["critic activations (2 x 4 tokens, activation checkpointing)"] == 2 * 8 * 8 * 2


QWEN_LIKE = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 176, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 128, "tie_word_embeddings": True}


def _kept_by_autograd(layers: int, lora_r: int, dropout: float, checkpointing: bool, tokens: tuple) -> int:
    """Bytes autograd keeps for the backward pass of one training forward of a random Qwen2-shaped model (SDPA
    attention, fp32): every saved tensor's storage once, the weights left out."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(**{**QWEN_LIKE, "num_hidden_layers": layers}, attn_implementation="sdpa"))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora_r:
        model = get_peft_model(model, LoraConfig(r=lora_r, target_modules="all-linear", lora_dropout=dropout))
        model.enable_input_require_grads()
    model.train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=torch.randint(0, QWEN_LIKE["vocab_size"], tokens), use_cache=False)
    return sum(kept.values())


@pytest.mark.parametrize("lora_r,dropout", [(0, 0.0), (8, 0.0), (8, 0.1)], ids=["full", "lora", "lora-dropout"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["", "checkpointing"])
def test_the_activation_count_is_what_autograd_keeps(lora_r, dropout, checkpointing):
    """The plan's activations per decoder layer against the tensors autograd really saves, measured with
    saved_tensors_hooks on 4 and 2 layers (their difference: two layers, with the embeddings, final norm and
    output layer cancelled). Under LoRA the frozen layers' inputs are kept anyway, by each adapter's A projection;
    with dropout its dropped-out copy and mask are kept too. Measured: 0.97 (full), 1.07 (LoRA), 0.99 (LoRA with
    dropout) of what autograd keeps; under checkpointing each layer's input exactly."""
    from align.plan import memory
    from align.plan.shapes import meta_shape

    batch, length = 2, 48
    measured = (_kept_by_autograd(4, lora_r, dropout, checkpointing, (batch, length))
                - _kept_by_autograd(2, lora_r, dropout, checkpointing, (batch, length)))
    planned = [memory.activation_parts(meta_shape("q", {**QWEN_LIKE, "num_hidden_layers": n}), batch * length,
                                       checkpointing, 4, lora_r, dropout > 0)[0] for n in (4, 2)]
    ratio = (planned[0] - planned[1]) / measured
    if checkpointing:
        assert ratio == 1.0
    else:
        assert 0.9 < ratio < 1.1, ratio


def test_plan_of_a_7b_ppo_recipe_on_eight_gpus_with_no_model_on_disk(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = run_cli(["plan", "recipe=rlhf_ppo", "model=qwen2_5_7b", "deepspeed=zero3", "peft=lora", "plan.gpus=8",
                    "plan.gpu_memory=80GB"], monkeypatch)
    out = capsys.readouterr().out
    assert code == 0
    assert "7.62B parameters" in out and "8 GPU(s) of 80.0 GB" in out
    for stage in ("sft", "rm", "ppo"):
        assert f"{stage}: peak" in out and "fits" in out
    assert "rollout KV cache (64 x 768 tokens)" in out and "critic LoRA adapter" in out


TRAINING_LIBRARIES = ("peft", "trl", "deepspeed", "datasets", "accelerate", "bitsandbytes", "transformers.trainer")


def test_the_plan_command_imports_no_training_library(tmp_path):
    """`align plan` answers in seconds because it imports torch and Hydra only: every stage module is imported for
    its SPEC, and one stray top-level `from transformers import TrainerCallback` pulled in the Trainer, PEFT,
    DeepSpeed and bitsandbytes (9 s to print the table, against 2.7 s without). A fresh interpreter runs the
    command, then lists which of those it loaded."""
    import subprocess
    import sys

    script = ("import sys\nfrom align.__main__ import main\nsys.argv = ['align', 'plan', 'recipe=rlhf_ppo', "
              "'model=qwen2_5_7b', 'plan.gpus=8', 'plan.gpu_memory=80GB', 'run.root=" + str(tmp_path) + "']\n"
              "main()\nprint('LOADED', sorted(m for m in " + repr(TRAINING_LIBRARIES) + " if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ppo: peak" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "LOADED []"


def test_the_vllm_share_counts_while_training_only_when_the_engine_does_not_sleep():
    """rollout.engine=vllm reserves gpu_memory_utilization x the GPU for sampling; on a GPU the engine sleeps while the
    step trains (weights and KV cache released), so the training phase holds it only with rollout.sleep=off."""
    from align.plan.shapes import shape_of
    from align.plan.stage_plan import plan_stage

    common = ("stage=grpo", "model=qwen2_5_7b", "peft=lora", "data=custom", "model.dtype=bf16",
              "rollout.engine=vllm", "rollout.gpu_memory_utilization=0.3")
    s = shape_of(compose(*common).model.name_or_path)
    hf = plan_stage(compose(*common[:-2]), s, 1, 80e9)
    asleep = plan_stage(compose(*common), s, 1, 80e9)
    awake = plan_stage(compose(*common, "rollout.sleep=off"), s, 1, 80e9)
    share = dict(awake.rows)["vLLM engine share (rollout.gpu_memory_utilization=0.3; kept while training: "
                             "rollout.sleep=off)"]
    assert share == 0.3 * 80e9
    assert "vLLM engine share (rollout.gpu_memory_utilization=0.3; released while training)" in dict(asleep.rows)
    rows = dict(awake.rows)
    kv = next(v for k, v in awake.rows if k.startswith("rollout KV cache"))
    training = sum(v for k, v in awake.rows if not k.startswith(("rollout KV cache", "vLLM engine share")))
    assert share > kv and dict(hf.rows).keys() == {k for k in rows if not k.startswith("vLLM")}
    assert asleep.peak == max(training, training - sum(v for k, v in awake.rows if k.startswith(("activations",
                                                                                               "logits"))) + share)
    assert awake.phase == "training" and awake.peak == training + share


def test_a_stage_that_does_not_fit_gets_the_overrides_that_make_it_fit():
    from align.plan.report import fitting
    from align.plan.shapes import shape_of
    from align.plan.stage_plan import plan_stage

    cfg = compose("stage=sft", "model=qwen2_5_7b", "data=custom", "model.dtype=bf16")
    s = shape_of(cfg.model.name_or_path)
    assert plan_stage(cfg, s, 1, 24e9).verdict == "does not fit"
    found = fitting(cfg, s, 1, 24e9)
    assert found and all(p.verdict == "fits" and p.peak <= 0.9 * 24e9 for _, p in found)
    assert "peft=lora" in found[0][0] or "peft=qlora" in found[0][0]  # cheaper than offloading everything
    assert plan_stage(cfg, s, 8, 80e9).verdict == "does not fit"  # full weights without ZeRO: 8 bytes a parameter and the logits


def test_preflight_warns_and_with_strict_refuses_before_loading(monkeypatch, caplog):
    from align.config.rules import Unsupported
    from align.plan import report

    monkeypatch.setattr(report, "gpus_and_memory", lambda cfg: (1, 24e9))
    cfg = compose("stage=sft", "model=qwen2_5_7b", "data=custom", "model.dtype=bf16")
    with caplog.at_level("WARNING", logger="align"):
        report.preflight(cfg)
    assert "more than the 24.0 GB there is" in caplog.text and "peft=" in caplog.text
    with pytest.raises(Unsupported, match="Nothing was loaded"):
        report.preflight(compose("stage=sft", "model=qwen2_5_7b", "data=custom", "model.dtype=bf16",
                                 "plan.strict=true"))
    caplog.clear()
    report.preflight(compose("stage=sft"))  # the tiny model fits: nothing said
    assert not caplog.text


def test_memory_sizes_and_an_unknown_model_are_read_or_refused_with_the_fix(tmp_path):
    from align.plan.report import PlanError, parse_memory
    from align.plan.shapes import ShapeUnknown, shape_of

    assert parse_memory("80GB") == 80e9 and parse_memory("80GiB") == 80 * 2**30 and parse_memory("24000MB") == 24e9
    assert parse_memory(40) == 40e9 and parse_memory(None) is None
    with pytest.raises(PlanError, match="80GB"):
        parse_memory("eighty")
    with pytest.raises(ShapeUnknown, match="local folder with its config.json"):
        shape_of(str(tmp_path / "nowhere"))
