"""generate()'s KV cache carried from one turn of a step's episodes to the next, so that a turn prefills only what
the environment added (and the generation prompt), not the whole conversation again.

After a turn, each row of the cache holds the keys and values of its context and of the tokens it sampled (all but
the last, which was never fed back). On the next turn an episode's context is that row's tokens (up to its end of
turn), then the environment's turns. For each episode, the new context is compared with the tokens its row holds;
the common prefix is reused: the rows are gathered into the new left-padded layout (a token keeps its position:
positions follow the attention mask, not the slot), and generate() runs on the rest. Where the layouts leave no
common prefix, or the model's cache does not hold every token (a sliding window that has dropped some, linear
attention), the turn is prefilled whole, as before. Reuse is exact up to float summation order: a greedy episode
writes the same tokens (tests/test_turn_cache.py).

The vLLM engine has its own prefix cache and does not use this one.
"""

from __future__ import annotations

import inspect

import torch

from align.data.chat import common_prefix


def cache_kwarg(model) -> str:
    """The name generate() takes a cache under: `cache` from transformers 5.2x, `past_key_values` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _whole(cache) -> bool:
    """Every layer holds the keys and values of every token so far (a growing layer, or a sliding-window one that
    has not yet dropped any): what can be gathered into a new layout."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) and layer.is_initialized
                                and layer.keys.shape[-2] == layer.get_seq_length() for layer in layers)


class TurnCache:
    """The cache of one step's episodes; the runner names the episodes of each batch (rows()) before sampling."""

    def __init__(self):
        self.keys: list = []  # the episodes of the batch about to be sampled, in row order
        self._cache = None
        self._held: dict = {}  # episode -> (row, slot of its first token, the ids whose KV the row holds)
        self.reused = 0  # context tokens taken from the cache, over the run
        self.prefilled = 0  # context tokens computed again

    def rows(self, keys: list) -> "TurnCache":
        self.keys = list(keys)
        return self

    def prefix(self, model, contexts: list[list[int]], width: int):
        """The cache to give generate() for these contexts, left-padded to `width`: the reusable prefix of each row
        gathered into the new layout, or an empty cache."""
        from transformers.cache_utils import DynamicCache

        config = model.config
        fresh = DynamicCache(config=config) if config is not None else DynamicCache()
        held = [self._held.get(k) for k in self.keys] if len(self.keys) == len(contexts) else [None]
        if self._cache is None or any(h is None for h in held) or not _whole(self._cache):
            self._count(contexts, 0)
            return fresh
        reusable = [common_prefix(ids, ctx) for (_, _, ids), ctx in zip(held, contexts)]
        # slots [0, common) can come from the cache in every row; at least one token is fed
        common = min(min(width - len(c) + k for c, k in zip(contexts, reusable)), width - 1)
        if common <= 0 or len(fresh.layers) not in (0, len(self._cache.layers)):
            self._count(contexts, 0)
            return fresh
        slot = torch.arange(common)
        index = torch.stack([(start + slot - (width - len(c))).clamp(min=start)  # pads: any slot, masked anyway
                             for (_, start, _), c in zip(held, contexts)])
        source_rows = torch.tensor([row for row, _, _ in held])
        for i, layer in enumerate(self._cache.layers):
            k, v = (t.index_select(0, source_rows.to(t.device)) for t in (layer.keys, layer.values))
            at = index.to(k.device)[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
            fresh.update(torch.gather(k, 2, at), torch.gather(v, 2, at), i)
        self._cache, self._held = None, {}  # gathered: the previous turn's cache is freed before generate() grows this
        self._count(contexts, sum(max(0, common - (width - len(c))) for c in contexts))
        return fresh

    def keep(self, cache, sequences: torch.Tensor, contexts: list[list[int]], width: int) -> None:
        """After generate(): what each row of `cache` holds, for the next turn."""
        self._cache = cache if _whole(cache) else None
        if self._cache is None:
            self._held = {}
            return
        length = cache.get_seq_length()
        rows = sequences[:, :length].tolist()
        self._held = {key: (row, width - len(c), rows[row][width - len(c):])
                      for row, (key, c) in enumerate(zip(self.keys, contexts))}

    def _count(self, contexts: list[list[int]], reused: int) -> None:
        self.reused += reused
        self.prefilled += sum(len(c) for c in contexts) - reused
