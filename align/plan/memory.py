"""The memory arithmetic of one GPU, in bytes: pure functions of a model's shape and the run's settings.

Model states follow DeepSpeed's own accounting for mixed precision (16-bit weights; fp32 master weights, fp32
gradients and Adam's two moments of what trains), so that under ZeRO-2 and ZeRO-3 they equal
`estimate_zero2_model_states_mem_needs` / `estimate_zero3_model_states_mem_needs` to the byte (tested):

    ZeRO-2:  2 P  + 18 T / N          ZeRO-3:  4 L + 2 P / N + 16 T / N      (P every parameter, T the trained ones,
    ZeRO-1:  2 P  +  6 T + 12 T / N   offload_optimizer: the T terms move to the CPU; offload_param: the 2 P too)
    ZeRO-0:  2 P  + 18 T              no DeepSpeed: 2 P + T x (grad + Adam m, v in the trained weights' dtype)

L is the largest single layer's parameters, gathered whole under ZeRO-3. A LoRA adapter trains in fp32 (PEFT keeps
adapters in fp32). QLoRA's base linear weights take 4 bits plus their quantization constants (NF4, blocks of 64:
with double quantization 8-bit constants and an fp32 one per 256 blocks).

Activations: what a decoder layer keeps for the backward pass with fused attention (SDPA/flash: no [s, s] matrix),
per token: its two RMSNorm inputs and outputs (4 h), q, k, v before and after RoPE and the attention output
(3 a d + 3 kv d), the MLP's gate, up, act(gate) and their product (4 i), and under LoRA each adapter's A output and
(with dropout) its dropped-out input and mask; with activation checkpointing each layer keeps only its input (h)
and one layer at a time is recomputed. The output layer runs in chunks of 2**24 logits
(align/rl/logprobs.py) or, in TRL's trainers, over the whole micro-batch.
"""

from __future__ import annotations

from align.plan.shapes import Shape

GB = 1e9
GiB = 2**30
CHUNK_LOGITS = 2**24  # align/rl/logprobs.py
CUDA_CONTEXT = 1.0 * GiB  # the CUDA context, cuBLAS workspace and allocator slack on each GPU


def dtype_bytes(name: str) -> int:
    return {"fp32": 4, "bf16": 2, "fp16": 2, "auto": 2}[name]


def quantized_weight_bytes(shape: Shape, bits: int, double_quant: bool, compute_bytes: int) -> float:
    """A QLoRA base: the decoder's linear weights at `bits` bits plus constants; embeddings, norms and the output
    layer stay in the compute dtype (bitsandbytes leaves them)."""
    per_block = (1 + 4 / 256) if double_quant else 4  # bytes of constants per block of 64 weights
    linear = shape.linear_params * (bits / 8 + (per_block / 64 if bits == 4 else 4 / 64))
    return linear + (shape.params - shape.linear_params) * compute_bytes


def trained_states(trained: int, zero: int, gpus: int, offload_optimizer: bool, plain_bytes: int) -> float:
    """Gradients, fp32 master weights and Adam moments of `trained` parameters on one GPU (see the module doc)."""
    if offload_optimizer and zero >= 1:
        return 0.0
    if zero < 0:  # torch's AdamW on the weights as they are: a gradient and two moments in their dtype
        return 3 * trained * plain_bytes
    if zero == 0:
        return 18 * trained
    if zero == 1:
        return 6 * trained + 12 * trained / gpus
    if zero == 2:
        return 18 * trained / gpus
    return 16 * trained / gpus


def weight_bytes(params: float, largest_layer: int, zero: int, gpus: int, offload_param: bool) -> float:
    """`params` worth of 16-bit weights (or their byte count already, for quantized ones) held on one GPU."""
    if zero == 3:
        return 4 * largest_layer + (0 if offload_param else params / gpus)
    return params


def activation_bytes(shape: Shape, tokens: int, checkpointing: bool, compute_bytes: int, lora_r: int = 0,
                     lora_dropout: bool = False) -> float:
    """What the backward pass keeps of one micro-batch of `tokens` tokens (batch x length). With LoRA adapters
    (`lora_r`) each adapted linear layer also keeps its A projection's output (r values), and with LoRA dropout the
    dropped-out copy of its input and the dropout mask (a byte a value)."""
    return sum(activation_parts(shape, tokens, checkpointing, compute_bytes, lora_r, lora_dropout))


def activation_parts(shape: Shape, tokens: int, checkpointing: bool, compute_bytes: int, lora_r: int = 0,
                     lora_dropout: bool = False) -> tuple[float, float]:
    """activation_bytes as (kept from the forward pass until the backward, the one layer recomputed at a time under
    activation checkpointing): two models whose forwards both run before their backwards (PPO's actor and critic)
    keep both their first parts, but recompute one layer at a time."""
    h, a, d, kv, i = shape.hidden, shape.heads, shape.head_dim, shape.kv_heads, shape.intermediate
    per_layer = (4 * h + 3 * a * d + 3 * kv * d + 4 * i) * tokens * compute_bytes
    if lora_r:
        inputs = sum(n for n, _ in shape.lora_dims)
        per_layer += len(shape.lora_dims) * lora_r * tokens * compute_bytes
        per_layer += inputs * tokens * (compute_bytes + 1) if lora_dropout else 0
    if checkpointing:
        return shape.layers * h * tokens * compute_bytes, per_layer
    return shape.layers * per_layer, 0.0


def logits_bytes(shape: Shape, tokens: int, chunked: bool) -> float:
    """The output layer's logits: align's chunks (fp32 logits, their log-softmax and its gradient, one chunk at a
    time) or the whole micro-batch's in fp32 (TRL's trainers: logits, log-softmax, gradient)."""
    return 3 * 4 * (min(CHUNK_LOGITS, tokens * shape.vocab) if chunked else tokens * shape.vocab)


def kv_cache_bytes(shape: Shape, sequences: int, tokens: int, compute_bytes: int) -> float:
    """Keys and values of every layer for `sequences` sequences of `tokens` tokens."""
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * sequences * tokens * compute_bytes


def deepspeed_model_states(shape: Shape, zero: int, gpus: int, offload_optimizer: bool,
                           offload_param: bool) -> float:
    """Full fine-tuning's model states by DeepSpeed's own estimator (ZeRO-2 and ZeRO-3, one node)."""
    if zero == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        return estimate_zero3_model_states_mem_needs(shape.params, shape.largest_layer_params, gpus, 1,
                                                     cpu_offload=offload_optimizer, cpu_offload_params=offload_param)[1]
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    return estimate_zero2_model_states_mem_needs(shape.params, gpus, 1, cpu_offload=offload_optimizer)[1]
