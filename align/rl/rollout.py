"""Running the models on a batch of prompts: sampling responses, per-token log-probs, per-token
values/scores. Prompts are left-padded, responses right-padded; position ids follow the attention
mask, so a left-padded row is computed exactly as it would be alone."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from align.rl.logprobs import causal_lm_parts, token_logprobs, transformers_model
from align.rl.shaping import last_index, response_mask
from align.rl.turn_cache import TurnCache, cache_kwarg


@dataclass
class Batch:
    queries: torch.Tensor  # [B, Q] left-padded prompt ids
    query_mask: torch.Tensor  # [B, Q]
    responses: torch.Tensor  # [B, R] sampled ids, pad after the end
    mask: torch.Tensor  # [B, R] 1 on the tokens the policy wrote: up to and including the stop token
    ended: torch.Tensor  # [B] a stop token was generated (an episode: its last model turn ended with one)
    engine_logp: torch.Tensor | None = None  # [B, R] log-probs of the sampled tokens as the engine sampled them
    # (rollout.engine=vllm; 0 past the end); None where the trained model itself sampled
    present: torch.Tensor | None = None  # [B, R] 1 on every real token: a multi-turn episode's environment turns
    # too (context, not trained: mask is 0 there); None: the same as mask (one answer)

    @property
    def sequences(self) -> torch.Tensor:
        return torch.cat([self.queries, self.responses], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.query_mask, self.mask if self.present is None else self.present], dim=1)

    def _fields(self) -> tuple:
        return self.queries, self.query_mask, self.responses, self.mask, self.ended, self.engine_logp, self.present

    def to(self, device) -> "Batch":
        return Batch(*(None if t is None else t.to(device) for t in self._fields()))

    def select(self, idx: torch.Tensor) -> "Batch":
        return Batch(*(None if t is None else t[idx] for t in self._fields()))

    @staticmethod
    def concat(batches: list["Batch"], pad_id: int) -> "Batch":
        """The rows of several batches, one after the other: prompts left-padded and responses right-padded to
        the widest (pad_id for ids, 0 for masks and log-probs)."""
        def rows(name: str, pad, left: bool = False):
            return concat_rows([getattr(b, name) for b in batches], pad, left)

        return Batch(rows("queries", pad_id, left=True), rows("query_mask", 0, left=True), rows("responses", pad_id),
                     rows("mask", 0), rows("ended", 0), rows("engine_logp", 0), rows("present", 0))


def concat_rows(tensors: list, pad_value, left: bool = False):
    """[sum N, widest] from [N_i, W_i] tensors padded with `pad_value` (on the left with `left`); 1-D tensors are
    concatenated as they are; None when they are None."""
    if tensors[0] is None:
        return None
    if tensors[0].dim() == 1:
        return torch.cat(tensors)
    width = max(t.shape[1] for t in tensors)
    padded = [torch.nn.functional.pad(t, (width - t.shape[1], 0) if left else (0, width - t.shape[1]),
                                      value=pad_value) for t in tensors]
    return torch.cat(padded)


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def right_pad(seqs: list[list[int]], pad_value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, longest] ids padded on the right with `pad_value`, and the mask of real tokens (on CPU)."""
    ids = torch.full((len(seqs), max(len(s) for s in seqs)), pad_value, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


def decode_responses(tokenizer, batch: "Batch") -> list[str]:
    """Each response's text, up to and including its stop token (special tokens dropped)."""
    return [tokenizer.decode(r[m.bool()], skip_special_tokens=True) for r, m in zip(batch.responses, batch.mask)]


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def stop_token_ids(tokenizer, extra: list[str]) -> list[int]:
    """EOS, the chat template's end-of-turn token, and the single-token stops in `extra` (stage.stop_tokens)."""
    from align.data.chat import end_of_turn_ids

    ids = end_of_turn_ids(tokenizer)
    for text in extra:
        tok = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(tok) != 1:
            raise ValueError(f"stage.stop_tokens entry {text!r} is {len(tok)} tokens; stop tokens must be single tokens")
        ids.append(tok[0])
    return sorted(set(ids))


@torch.no_grad()
def generate(actor, prompts: list[list[int]], *, pad_id: int, stop_ids: list[int], max_new_tokens: int,
             temperature: float, top_p: float, greedy: bool = False, synced_gpus: bool = False,
             device=None, turns: TurnCache | None = None) -> Batch:
    """Sample (or decode greedily) one response per prompt with the KV cache; cut each at its first stop.
    `turns`: an episode's turns after the first reuse the cache of its previous turn (align/rl/turn_cache.py)."""
    device = device or next(actor.parameters()).device
    queries, query_mask = left_pad(prompts, pad_id, device)
    kwargs = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    if turns is not None:
        cache = kwargs[cache_kwarg(actor)] = turns.prefix(actor, prompts, queries.shape[1])
    out = actor.generate(input_ids=queries, attention_mask=query_mask, max_new_tokens=max_new_tokens,
                         eos_token_id=stop_ids, pad_token_id=pad_id, use_cache=True, synced_gpus=synced_gpus,
                         **kwargs)
    if turns is not None:
        turns.keep(cache, out, prompts, queries.shape[1])
    responses = out[:, queries.shape[1]:]
    if responses.shape[1] == 0:
        responses = torch.full((len(prompts), 1), pad_id, dtype=torch.long, device=device)
    mask, ended = response_mask(responses, stop_ids)
    responses = responses.masked_fill(mask == 0, pad_id)
    return Batch(queries, query_mask, responses, mask, ended)


def response_logprobs(model, batch: Batch, temperature: float = 1.0, with_entropy: bool = False):
    """log pi(token) of every response token under `model` (logits / temperature), and the entropy; by chunks
    of positions through the output layer, so no [B, T, V] float32 tensor is built (align/rl/logprobs.py)."""
    seq, attn = batch.sequences, batch.attention_mask
    backbone, head, transform = causal_lm_parts(model)
    hidden = backbone(input_ids=seq, attention_mask=attn, position_ids=positions(attn), use_cache=False).last_hidden_state
    q = batch.queries.shape[1]
    return token_logprobs(hidden[:, q - 1 : -1], batch.responses, head, transform, temperature, with_entropy)


def _seq_cls_parts(model):
    """(backbone, score head) of a sequence classifier, through PEFT and DeepSpeed wrappers."""
    m = transformers_model(model)
    head = getattr(m, "score", None)
    if head is None:
        raise ValueError(f"{type(m).__name__} has no `score` head: the critic/reward must be a sequence classifier "
                         "(a reward model stage's output)")
    return getattr(m, m.base_model_prefix), head


def token_scores(model, batch: Batch) -> torch.Tensor:
    """The score head at every position of prompt+response: [B, Q+R]."""
    backbone, head = _seq_cls_parts(model)
    attn = batch.attention_mask
    hidden = backbone(input_ids=batch.sequences, attention_mask=attn, position_ids=positions(attn),
                      use_cache=False).last_hidden_state
    return head(hidden).squeeze(-1).float()


def last_token_scores(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The score head at each sequence's last real token by the attention mask, [B]: the end-of-turn token,
    also where it doubles as the pad token (transformers' own pooling skips every pad id, that one too)."""
    backbone, head = _seq_cls_parts(model)
    hidden = backbone(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False).last_hidden_state
    steps = torch.arange(mask.shape[1], device=mask.device)
    last = (mask.long() * steps).argmax(-1)
    return head(hidden[torch.arange(hidden.shape[0], device=hidden.device), last]).squeeze(-1).float()


def values(critic, batch: Batch) -> torch.Tensor:
    """V(state before each response token): the critic at positions Q-1 .. Q+R-2, [B, R]."""
    q = batch.queries.shape[1]
    return token_scores(critic, batch)[:, q - 1 : -1]


def sequence_scores(reward_model, batch: Batch) -> torch.Tensor:
    """The reward model's score of each full response (at its last real token), [B]."""
    q = batch.queries.shape[1]
    last = q + last_index(batch.mask)
    scores = token_scores(reward_model, batch)
    return scores[torch.arange(scores.shape[0], device=scores.device), last]


def adapter_disabled(model):
    """Context in which a PEFT model computes with its base weights (the reference of a LoRA actor)."""
    m = getattr(model, "module", model)
    return m.disable_adapter() if hasattr(m, "disable_adapter") else nullcontext()


@torch.no_grad()
def score(model, sequences: list[list[int]], pad_token_id: int, batch_size: int = 32) -> torch.Tensor:
    """Reward of each token sequence (the score head at its last token), as float32."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(sequences), batch_size):
        ids, mask = right_pad(sequences[i : i + batch_size], pad_token_id)
        out.append(last_token_scores(model, ids.to(device), mask.to(device)).cpu())
    return torch.cat(out)
