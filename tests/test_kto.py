"""stage=kto: unpaired feedback in every shape (a bad label named by file and row), the class weights balanced by
hand-computed counts, and on the demo's pairs (two rows each) the policy moves its held-out chosen answers above
its rejected ones, read back by plain transformers."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import compose, write_jsonl


def kto(runs, *overrides):
    from align.stages.kto import run

    return run(compose("stage=kto", f"run.root={runs}", "train.logging_steps=1", "train.save_steps=10000",
                       *overrides))


def test_feedback_in_every_shape_and_a_bad_label_named_with_its_row(tmp_path):
    from transformers import AutoTokenizer

    from align.data.errors import DataError
    from align.data.loader import feedback_datasets
    from align.models.loading import resolve_name

    tok = AutoTokenizer.from_pretrained(resolve_name("builtin:tiny"))
    rows = [{"prompt": "Spell cat.", "completion": "c a t", "label": True},
            {"messages": [{"role": "user", "content": "Spell dog."}, {"role": "assistant", "content": "d o"}],
             "label": 0},
            {"prompt": "Spell cow.", "chosen": "c o w", "rejected": "c o"},  # a pair: two rows
            {"prompt": "Spell pig.", "completion": "p i g", "label": "yes"},
            {"prompt": "Spell hen.", "completion": "h e n"}]
    path = write_jsonl(tmp_path / "feedback.jsonl", rows)
    with pytest.raises(DataError) as error:
        feedback_datasets(compose("stage=kto", f"data.train={path}").data, tok, 64, 0)
    text = str(error.value)
    assert f"{path}" in text and "row 4" in text and "'yes'" in text and "true/false (or 1/0)" in text
    train, _, report = feedback_datasets(compose("stage=kto", f"data.train={path}", "data.on_error=skip").data,
                                         tok, 64, 0)
    assert train["label"] == [True, False, True, False] and len(report.errors.skipped) == 2
    assert tok.decode(train[0]["completion_ids"]).startswith("c a t")
    assert tok.decode(train[2]["completion_ids"]).startswith("c o w") and train[2]["prompt_ids"] == \
        train[3]["prompt_ids"]


def test_class_weights_balance_the_counts_by_hand():
    from align.stages.kto import class_weights

    assert class_weights([True, True, True, False], None, None) == (1.0, 3.0)  # 1 x 3 = 3 x 1
    assert class_weights([True, False, False, False, False], None, None) == (4.0, 1.0)
    assert class_weights([True, True, False], 2.0, None) == (2.0, 4.0)  # one given: the other balances it
    assert class_weights([True, True, False], None, 0.5) == (0.25, 0.5)
    assert class_weights([True, False], 1.5, 0.7) == (1.5, 0.7)  # both given: as given
    assert class_weights([True, True], None, None) == (1.0, 1.0)  # one class only


@pytest.fixture(scope="module")
def demo_kto(tmp_path_factory):
    return kto(tmp_path_factory.mktemp("kto") / "runs", "train.max_steps=120", "train.batch_size=16",
               "train.lr=3e-3")


def pair_margins(model, rows) -> torch.Tensor:
    """log pi(chosen) - log pi(rejected) of each held-out pair, summed over each completion."""
    def logp(prompt, completion):
        ids = torch.tensor([prompt + completion])
        logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        return logps[len(prompt) - 1:].gather(-1, ids[0, len(prompt):, None]).sum()

    with torch.no_grad():
        return torch.stack([logp(r["prompt_ids"], r["chosen_ids"]) - logp(r["prompt_ids"], r["rejected_ids"])
                            for r in rows])


def test_kto_on_the_demo_pairs_moves_chosen_answers_above_rejected_ones(demo_kto):
    from transformers import AutoModelForCausalLM

    from align.models.loading import resolve_name
    from test_dpo import eval_pairs

    m = demo_kto.metrics
    # step 1: the policy is the reference, every reward and the KL estimate are 0: 1 - sigmoid(0) for either class,
    # each weighing 1 (the pairs give as many desirable as undesirable answers)
    assert m["first_loss"] == pytest.approx(0.5, abs=1e-5)
    assert m["desirable_weight"] == m["undesirable_weight"] == 1.0
    assert m["data/desirable_rows"] * 2 == m["data/train_rows"]
    # measured: eval loss 0.439, margin 0.86 (rewards -2.17 / -3.03: both answers fell, the rejected further)
    assert m["eval_loss"] < 0.47 and m["train_loss"] < m["first_loss"], m
    assert m["eval_rewards_desirable"] > m["eval_rewards_undesirable"] and m["eval_margin"] > 0.4, m
    record = json.loads((demo_kto.out / "stage.json").read_text())
    assert record["stage"] == "kto" and record["task"] == "causal_lm"
    # read back by plain transformers: on held-out pairs the chosen answer gained on the rejected one
    model = AutoModelForCausalLM.from_pretrained(demo_kto.out / "model").eval()
    start = AutoModelForCausalLM.from_pretrained(resolve_name("builtin:tiny")).eval()
    rows = eval_pairs(demo_kto.out / "model")
    after, before = pair_margins(model, rows), pair_margins(start, rows)
    # measured over the 300 held-out pairs: mean margin 0.11 -> 2.85 nats, median gain 1.03, chosen ahead 57% -> 59%
    assert after.mean() > before.mean() + 1.5 and (after - before).median() > 0.3, (after.mean(), before.mean())
    assert (after > 0).float().mean() > (before > 0).float().mean()
    assert math.isfinite(m["eval_kl"])


def test_a_lora_kto_over_a_lora_sft_trains_a_fresh_adapter_on_the_merged_sft(tmp_path):
    from safetensors.torch import load_file

    from test_dpo import sft

    runs = tmp_path / "runs"
    sft(runs, "peft=lora", "train.max_steps=3", "data.max_rows=64")
    result = kto(runs, "peft=lora", "train.max_steps=4", "data.max_rows=64", "train.batch_size=8", "train.lr=5e-3")
    record = json.loads((result.out / "stage.json").read_text())
    assert record["weights"] == "lora" and [p["stage"] for p in record["parents"]] == ["sft"]
    weights = load_file(result.out / "model" / "adapter_model.safetensors")
    assert max(w.abs().max().item() for k, w in weights.items() if "lora_B" in k) > 0  # B starts at zero: trained
    assert result.metrics["first_loss"] == pytest.approx(0.5, abs=1e-5)  # the reference: the policy, adapter off
