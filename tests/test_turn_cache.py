"""An episode's turns after the first reuse generate()'s KV cache of its previous turn (align/rl/turn_cache.py): on
each fixture family the episodes write the same tokens as when every turn prefills its whole context, greedy and
sampled, while episodes of different lengths drop out between turns."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from align.data.chat import encode_prompt, ensure_chat_template
from align.data.prompts import Prompt
from align.rl import rollout
from align.rl.episodes import EpisodeRunner
from families import FAMILIES, build

# Uneven (tests/envs_for_tests.py): a question of even length ends after the first turn, an odd one goes on
QUESTIONS = ["Add 12 and 30.", "Say hi.", "What is 7 times 6, please?", "Name a colour", "Count to three.",
             "Is 91 a prime number?"]


def prompts(tok) -> list[Prompt]:
    out = []
    for n, q in enumerate(QUESTIONS):
        messages = [{"role": "user", "content": q}]
        out.append(Prompt(encode_prompt(tok, messages), q, None, "{}", json.dumps(messages), f"data row {n + 1}"))
    return out


def sampler(model, tok, reuse: bool):
    """generate() writing `n` tokens a turn, the last replaced by the end of turn (a random model seldom stops)."""
    def sample(contexts, greedy, n, turns):
        batch = rollout.generate(model, contexts, pad_id=tok.pad_token_id, stop_ids=[], max_new_tokens=n,
                                 temperature=1.0, top_p=1.0, greedy=greedy, device=torch.device("cpu"),
                                 turns=turns if reuse else None)
        batch.responses[:, -1] = tok.eos_token_id
        batch.ended[:] = True
        return batch
    return sample


@pytest.mark.parametrize("family", FAMILIES)
def test_turns_reuse_the_previous_turns_cache_and_write_the_same_tokens(family, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = build(family, tmp_path / family, seed=3)
    tok = AutoTokenizer.from_pretrained(folder)
    ensure_chat_template(tok)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    runner = EpisodeRunner(SimpleNamespace(cls="envs_for_tests:Uneven", kwargs={}, timeout_s=10), tok, max_turns=4,
                           max_episode_tokens=400, max_new_tokens=9, max_prompt_length=200, skip_errors=False)
    for greedy in (True, False):
        torch.manual_seed(0)
        whole = runner.run(sampler(model, tok, reuse=False), prompts(tok), greedy=greedy)
        torch.manual_seed(0)
        reused = runner.run(sampler(model, tok, reuse=True), prompts(tok), greedy=greedy)
        assert [e.turns for e in whole.items] == [1, 4, 1, 4, 4, 4]  # four go on after the others dropped out
        assert [e.ids for e in reused.items] == [e.ids for e in whole.items], (family, greedy)
        assert torch.equal(reused.batch.mask, whole.batch.mask)
        assert whole.reused == 0.0
        # turn 1 prefills every prompt; turns 2-4 only what the environment added and the generation prompt
        assert reused.reused > 0.5, (family, reused.reused)
        assert reused.stats()["episode/context_reused"] == reused.reused
