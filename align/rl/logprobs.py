"""Log-probabilities of chosen tokens without a [B, T, V] float32 tensor.

The backbone's hidden states go through the output layer a chunk of positions at a time; each chunk's
logits give the chosen token's log-prob (logit minus logsumexp) and, when asked, the entropy, and are
dropped. With gradients on, each chunk is recomputed in the backward pass (activation checkpointing), so
what stays alive is the hidden states ([B, T, H]), not the logits (under ZeRO-3, whose partitioned output
layer torch's recomputation refuses, the chunks' logits are kept for the backward pass). At Qwen 2.5's 151,936-token vocabulary
a rollout of 64 x 512 tokens needs ~20 GB for full fp32 log-softmax; chunked, 64 MiB at a time.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

CHUNK_ELEMENTS = 2**24  # logits per chunk (64 MiB in float32)


def transformers_model(model):
    """The transformers model inside DeepSpeed's engine and PEFT's wrappers (LoRA is injected in place, so
    calling its modules computes with the adapter, or without it inside `disable_adapter()`)."""
    m = getattr(model, "module", model)
    if hasattr(m, "peft_config"):  # PeftModel -> LoraModel -> the transformers model
        m = m.base_model.model
    return m


def causal_lm_parts(model):
    """(backbone, output layer, logits transform) of a causal LM, through PEFT and DeepSpeed wrappers. The
    transform is what the model's own forward does to the output layer's result (Gemma 2's soft-capping,
    Cohere's, Falcon-H1's and Granite's scaling)."""
    m = transformers_model(model)
    config = m.config.get_text_config()
    cap = getattr(config, "final_logit_softcapping", None)
    scale = next((v for v in (getattr(config, k, None) for k in ("logit_scale", "output_multiplier",
                                                                  "lm_head_multiplier")) if v is not None), None)
    divide = getattr(config, "logits_scaling", None)  # Granite, MiniCPM3

    def transform(logits: torch.Tensor) -> torch.Tensor:
        if scale is not None:
            logits = logits * scale
        if divide is not None:
            logits = logits / divide
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return getattr(m, m.base_model_prefix), m.get_output_embeddings(), transform


def _chunk(hidden, targets, head, transform, temperature: float, with_entropy: bool):
    logits = transform(head(hidden)).float() / temperature
    lse = torch.logsumexp(logits, dim=-1)
    chosen = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    if not with_entropy:
        return chosen, None
    entropy = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return chosen, entropy


def token_logprobs(hidden: torch.Tensor, targets: torch.Tensor, head, transform=lambda x: x, temperature: float = 1.0,
                   with_entropy: bool = False, chunk_elements: int = CHUNK_ELEMENTS):
    """log pi(targets) ([...]) from `hidden` ([..., H]) through `head`, `chunk_elements` logits at a time, and
    the entropy of each distribution when `with_entropy` (else None)."""
    shape = targets.shape
    flat_h, flat_t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    vocab = getattr(head, "out_features", None) or head.weight.shape[0]
    rows = max(1, chunk_elements // vocab)
    # ZeRO-3 partitions the output layer's weight between uses, which torch's recomputation refuses ("different
    # metadata"): there each chunk's logits are kept for the backward pass instead (chunked, not recomputed)
    recompute = torch.is_grad_enabled() and flat_h.requires_grad and not hasattr(head.weight, "ds_id")
    chosen, entropy = [], []
    for i in range(0, flat_h.shape[0], rows):
        args = (flat_h[i : i + rows], flat_t[i : i + rows], head, transform, temperature, with_entropy)
        c, e = checkpoint(_chunk, *args, use_reentrant=False) if recompute else _chunk(*args)
        chosen.append(c)
        entropy.append(e)
    logp = torch.cat(chosen).reshape(shape) if chosen else flat_h.new_zeros(shape, dtype=torch.float32)
    if not with_entropy:
        return logp, None
    return logp, (torch.cat(entropy).reshape(shape) if entropy else torch.zeros_like(logp))

