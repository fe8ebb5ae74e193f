"""What multi-turn episodes cost in generation against single-turn rollouts of the same length (docs/environments.md):
the same model, the same prompts, the same number of tokens written by the model, in one batched call (one turn)
or in T turns with the environment's answer between them (align/rl/episodes.py: one batched generation per turn,
the environment's turns rendered by the chat template and appended). Each episode count is measured twice in the
same run: every turn prefilling its whole context again, and the turns after the first reusing the KV cache of the
previous turn (align/rl/turn_cache.py, what the stages do).

    python bench/episodes.py [--sizes tiny,100m] [--episodes 32] [--tokens 48] [--turns 2,3,4] [--repeats 3]

Every model turn is cut at the same length (a random model seldom stops on its own): the single-turn rollout writes
`--tokens` tokens per prompt, an episode of T turns `--tokens / T` per turn, the last of each turn an end of turn.
The environment answers instantly with a fixed tool turn (its own time is not what this measures; it is logged per
step as time/env_share). Prints the median time of each and the ratio episode / single turn."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rollout import median_time, model_dir  # noqa: E402

ENV_MODULE = '''
class Echo:
    """Answers every model turn with the same tool turn and never ends the episode (the turn limit does)."""
    def __init__(self, **kwargs): pass
    def reset(self, row): return row["prompt"]
    def step(self, messages): return {"messages": [{"role": "tool", "content": "result: 12345"}], "done": False}
'''


def fixed_length(model, pad: int, stop: int, reuse: bool = True):
    """A sampler that writes exactly `n` tokens per context (generate() with no stop), the last replaced by the end of
    turn, as if the model had stopped there; `reuse`: turns reuse the previous turn's KV cache."""
    import torch

    from align.rl import rollout

    def sample(contexts, greedy, n, turns=None):
        batch = rollout.generate(model, contexts, pad_id=pad, stop_ids=[], max_new_tokens=n, temperature=1.0,
                                 top_p=1.0, device=torch.device("cpu"), turns=turns if reuse else None)
        batch.responses[:, -1] = stop
        batch.ended[:] = True
        return batch
    return sample


def measure(folder: Path, episodes: int, tokens: int, turns: list[int], repeats: int, work: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.data.chat import encode_prompt, ensure_chat_template
    from align.data.prompts import Prompt
    from align.rl.episodes import EpisodeRunner

    (work / "bench_env.py").write_text(ENV_MODULE)
    sys.path.insert(0, str(work))
    tok = AutoTokenizer.from_pretrained(folder)
    ensure_chat_template(tok)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    params = sum(p.numel() for p in model.parameters())
    sample = fixed_length(model, tok.pad_token_id, tok.eos_token_id)
    again = fixed_length(model, tok.pad_token_id, tok.eos_token_id, reuse=False)
    messages = [[{"role": "user", "content": f"subtract: {100 + 7 * i}-{900 - 11 * i}"}] for i in range(episodes)]
    prompts = [Prompt(encode_prompt(tok, m), m[0]["content"], None, "{}", json.dumps(m), f"bench row {i + 1}")
               for i, m in enumerate(messages)]
    torch.manual_seed(0)
    single = median_time(lambda: sample([p.ids for p in prompts], False, tokens), repeats)
    out = {"params_m": params / 1e6, "single_s": single, "turns": {}}
    for t in turns:
        runner = EpisodeRunner(SimpleNamespace(cls="bench_env:Echo", kwargs={}, timeout_s=30), tok, max_turns=t,
                               max_episode_tokens=10_000, max_new_tokens=tokens // t, max_prompt_length=10_000,
                               skip_errors=False)
        done = runner.run(sample, prompts)
        written = int(done.batch.mask.sum()) // episodes
        prefill = median_time(lambda: runner.run(again, prompts), repeats)
        seconds = median_time(lambda: runner.run(sample, prompts), repeats)
        out["turns"][t] = {"s": seconds, "model_tokens": written, "ratio": seconds / single, "reused": done.reused,
                           "prefill_s": prefill, "prefill_ratio": prefill / single}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny,100m")
    parser.add_argument("--episodes", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--turns", default="2,3,4")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    turns = [int(t) for t in args.turns.split(",")]
    print(f"| model | one turn of {args.tokens} | " + " | ".join(f"{t} turns of {args.tokens // t}: prefilled again | "
                                                                f"cache reused" for t in turns) + " |")
    print("|---|---|" + "---|---|" * len(turns))
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            r = measure(model_dir(size, Path(tmp)), args.episodes, args.tokens, turns, args.repeats, Path(tmp))
            cells = [f"{c['prefill_s']:.2f} s ({c['prefill_ratio']:.2f}x) | {c['s']:.2f} s ({c['ratio']:.2f}x; "
                     f"{c['reused']:.0%} of context reused)" for c in (r["turns"][t] for t in turns)]
            print(f"| {size} ({r['params_m']:.1f}M) | {r['single_s']:.2f} s | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
