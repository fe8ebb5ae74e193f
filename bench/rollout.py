"""Rollouts on transformers' generate() (rollout.engine=hf) against vLLM (rollout.engine=vllm) on this machine, in
the environment with vLLM (docs/rollouts.md), for the tiny demo model and random-initialised Qwen2-shaped models of
about 100M and 500M parameters (Qwen2.5-0.5B's own shape for the latter):

    python bench/rollout.py [--sizes tiny,100m,500m] [--prompts 8] [--group 4] [--tokens 32] [--steps 3]

1. Rollout alone: the same prompts (random ids, `prompts` x `group` answers, up to `tokens` new tokens each,
   sampled at temperature 1, EOS the only stop), timed after a warm-up call; for vLLM the weight sync
   that precedes every rollout after an optimizer step is timed beside it, and its engine start once.
2. A whole GRPO step: `python -m align stage=grpo` from the base model on the demo prompts, once per engine, the
   mean `time/step_s` over `steps` steps (the first step left out: the engines warm up) and the rollout's share of it.
   Full weights for the tiny model, LoRA for the others (what a CPU user would train). A random model earns no
   reward: groups with equal rewards are kept (stage.drop_zero_variance=false) so every step runs its update.

3. LoRA, merged or served (`--lora-forms`): a LoRA policy (rank 16 on every linear layer) either merged into the
   engine's dense weights at every sync (what align does), or served as an adapter by vLLM (`enable_lora`: the base
   weights loaded once, the adapter saved and reloaded in place after every step). Per step: the sync (merged: the
   whole model streamed; served: the adapter written and loaded by the next rollout) and the rollout itself.

Prints one table per part. Nothing here asserts a time."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, run_align

SIZES = {  # Qwen2 shapes: vocabulary 151936, tied embeddings
    "100m": dict(hidden_size=512, num_hidden_layers=12, num_attention_heads=8, num_key_value_heads=2,
                 intermediate_size=1408),
    "500m": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864),
}


def model_dir(size: str, root: Path) -> Path:
    """The tiny model's folder, or a random-initialised Qwen2 of that shape saved with the tiny tokenizer (the demo's
    prompts are byte-level: their ids are valid in any larger vocabulary)."""
    sys.path.insert(0, str(REPO))
    from align.models.tiny import TOKENIZER_DIR, tiny_model_dir

    if size == "tiny":
        return tiny_model_dir()
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    out = root / size
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    config = Qwen2Config(vocab_size=151936, max_position_embeddings=2048, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         **SIZES[size])
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def median_time(fn, repeats: int) -> float:
    """The median of `repeats` timed calls of fn, after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_rollouts(folder: Path, prompts: int, group: int, tokens: int, repeats: int = 3) -> dict:
    import torch
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.config.schema import RolloutConfig
    from align.rl import rollout
    from align.rl.vllm_engine import VLLMEngine

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    ids = [torch.randint(3, 250, (24,)).tolist() for _ in range(prompts) for _ in range(group)]
    # EOS alone stops: a random-initialised model rarely samples it, so both engines produce nearly every token
    common = dict(pad_id=tok.pad_token_id, stop_ids=[tok.eos_token_id], max_new_tokens=tokens, temperature=1.0,
                  top_p=1.0)

    hf = median_time(lambda: rollout.generate(model, ids, **common), repeats)
    cfg = OmegaConf.structured(RolloutConfig(engine="vllm"))
    engine = VLLMEngine(model, tok, cfg, max_len=24 + tokens, seed=0)
    sync = median_time(lambda: engine.sync(model, 0), repeats)
    vllm = median_time(lambda: engine.generate(ids, **common), repeats)
    out = {"hf_s": hf, "vllm_s": vllm, "sync_s": sync, "start_s": engine.start_s,
           "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    engine.close()
    engine = model = None  # freed before the next size loads
    import gc

    gc.collect()
    return out


def time_lora_forms(folder: Path, prompts: int, group: int, tokens: int, rank: int = 16, repeats: int = 3) -> dict:
    """Per-step cost of the two ways a LoRA policy reaches the engine: merged (VLLMEngine.sync) or served."""
    import gc

    import torch
    from omegaconf import OmegaConf
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    from align.config.schema import RolloutConfig
    from align.rl.vllm_engine import VLLMEngine, _config_folder
    from align.rl.weights import full_weights

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
                            LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear")).eval()
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)  # a trained adapter: B is no longer zero
    tok = AutoTokenizer.from_pretrained(folder)
    ids = [torch.randint(3, 250, (24,)).tolist() for _ in range(prompts) for _ in range(group)]
    common = dict(pad_id=tok.pad_token_id, stop_ids=[tok.eos_token_id], max_new_tokens=tokens, temperature=1.0,
                  top_p=1.0)

    engine = VLLMEngine(policy, tok, OmegaConf.structured(RolloutConfig(engine="vllm")), max_len=24 + tokens, seed=0)
    out = {"merged_sync_s": median_time(lambda: engine.sync(policy, 0), repeats),
           "merged_rollout_s": median_time(lambda: engine.generate(ids, **common), repeats)}
    engine.close()
    engine = None
    gc.collect()

    folder_cfg, _ = _config_folder(base, tok, torch.float32)
    threads, set_threads = torch.get_num_threads(), torch.set_num_threads
    llm = LLM(model=folder_cfg, tokenizer=folder_cfg, dtype=torch.float32, max_model_len=24 + tokens,
              load_format="dummy", seed=0, enforce_eager=True, enable_lora=True, max_lora_rank=rank, max_loras=1,
              generation_config="vllm")
    torch.set_num_threads = set_threads  # as VLLMEngine does: vLLM's CPU worker pins one thread and disables this
    torch.set_num_threads(threads)
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": full_weights(base, torch.float32),
                                                 "is_checkpoint_format": True})  # once: the base never changes
    params = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_tokens=tokens, logprobs=0, detokenize=False,
                            stop_token_ids=[tok.eos_token_id])
    requests = [TokensPrompt(prompt_token_ids=p) for p in ids]
    with tempfile.TemporaryDirectory() as adapter:
        def save():
            policy.save_pretrained(adapter)

        def rollout(inplace: bool):
            llm.generate(requests, params, use_tqdm=False,
                         lora_request=LoRARequest("policy", 1, adapter, load_inplace=inplace))

        save()
        out["served_save_s"] = median_time(save, repeats)
        out["served_rollout_reload_s"] = median_time(lambda: rollout(True), repeats)  # as after a step
        out["served_rollout_s"] = median_time(lambda: rollout(False), repeats)  # cached: the rollout alone
    llm = None
    shutil.rmtree(folder_cfg, ignore_errors=True)
    gc.collect()
    return out


def grpo_step(folder: Path, size: str, engine: str, prompts: int, group: int, tokens: int, steps: int) -> dict:
    peft = "peft=none" if size == "tiny" else "peft=lora"
    with tempfile.TemporaryDirectory() as tmp:
        run_align("grpo", f"model.name_or_path={folder}", "stage.init=base", peft, f"rollout.engine={engine}",
                  f"train.max_steps={steps}", f"stage.rollout_batch_size={prompts}", f"stage.group_size={group}",
                  f"train.batch_size={prompts * group}", f"stage.max_new_tokens={tokens}", "stage.eval_prompts=0",
                  "stage.drop_zero_variance=false", "stage.dynamic_sampling=0", "train.logging_steps=1",
                  run_root=Path(tmp) / "runs")
        history = [json.loads(line) for line in (Path(tmp) / "runs/demo/grpo/history.jsonl").read_text().splitlines()]
    later = history[1:] or history
    return {"step_s": statistics.mean(h["time/step_s"] for h in later),
            "share": statistics.mean(h["time/generation_share"] for h in later)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="tiny,100m,500m")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--lora-forms", action="store_true", help="part 3 only: LoRA merged vs served")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if args.lora_forms:
        return lora_forms(args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            folder = model_dir(size, Path(tmp))
            r = time_rollouts(folder, args.prompts, args.group, args.tokens)
            s = {e: grpo_step(folder, size, e, args.prompts, args.group, args.tokens, args.steps) for e in ("hf", "vllm")}
            rows.append((size, r, s))
            print(f"{size}: {json.dumps({**r, **{f'{e}_{k}': v for e, d in s.items() for k, v in d.items()}})}",
                  flush=True)
    n = args.prompts * args.group
    print(f"\n{n} answers x {args.tokens} tokens per rollout; CPU, {os.cpu_count()} cores; float32")
    print("| model | params | rollout hf | rollout vllm (+ sync) | hf / vllm | engine start | GRPO step hf "
          "(rollout share) | GRPO step vllm (rollout share) | hf / vllm |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size, r, s in rows:
        print(f"| {size} | {r['params_m']:.0f}M | {r['hf_s']:.2f} s | {r['vllm_s']:.2f} s (+{r['sync_s']:.2f} s) | "
              f"{r['hf_s'] / (r['vllm_s'] + r['sync_s']):.2f}x | {r['start_s']:.1f} s | {s['hf']['step_s']:.2f} s "
              f"({s['hf']['share']:.2f}) | {s['vllm']['step_s']:.2f} s ({s['vllm']['share']:.2f}) | "
              f"{s['hf']['step_s'] / s['vllm']['step_s']:.2f}x |")


def lora_forms(args) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            r = time_lora_forms(model_dir(size, Path(tmp)), args.prompts, args.group, args.tokens)
            rows.append((size, r))
            print(f"{size}: {json.dumps(r)}", flush=True)
    print(f"\nLoRA rank 16 on every linear layer; {args.prompts * args.group} answers x {args.tokens} tokens per rollout")
    print("| model | merged: sync | merged: rollout | merged: step total | served: adapter saved | served: rollout "
          "with the adapter reloaded | served: rollout, adapter cached | served: step total | merged / served |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size, r in rows:
        merged = r["merged_sync_s"] + r["merged_rollout_s"]
        served = r["served_save_s"] + r["served_rollout_reload_s"]
        print(f"| {size} | {r['merged_sync_s']:.2f} s | {r['merged_rollout_s']:.2f} s | {merged:.2f} s | "
              f"{r['served_save_s']:.2f} s | {r['served_rollout_reload_s']:.2f} s | {r['served_rollout_s']:.2f} s | "
              f"{served:.2f} s | {merged / served:.2f}x |")


if __name__ == "__main__":
    main()
