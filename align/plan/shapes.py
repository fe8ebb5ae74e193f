"""A model's shape without its weights: read from config.json (a local folder, the hub cache, or the shapes shipped
for align's model groups, shapes.json) and counted exactly: by formula for the Llama-style families align ships
groups for (tested equal to transformers' own model built on the meta device), on the meta device otherwise."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SHIPPED = Path(__file__).with_name("shapes.json")  # config.json values of align's model groups (public configs)
FORMULA_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")


class ShapeUnknown(ValueError):
    pass


@dataclass(frozen=True)
class Shape:
    """What the planner needs of a decoder-only transformer."""

    name: str
    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    params: int  # every parameter (tied embeddings once)
    layer_params: int  # one decoder layer's
    linear_params: int  # the decoder layers' nn.Linear weights, all layers (what LoRA targets, what 4-bit quantizes)
    lora_dims: tuple  # (in, out) of each nn.Linear of one decoder layer

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def largest_layer_params(self) -> int:
        """The largest single module's parameters (DeepSpeed's "largest layer": the embedding for these models)."""
        return max(self.embedding_params, self.layer_params)

    def lora_params(self, r: int) -> int:
        """Trainable parameters of LoRA rank r on every linear layer of the decoder (all-linear, as align's
        default target_modules; the output head is left out, as PEFT's all-linear leaves it)."""
        return self.layers * sum(r * (i + o) for i, o in self.lora_dims)


def config_dict(name_or_path: str) -> dict:
    """config.json of a local folder, else the hub cache's copy, else the shipped shape of that hub id."""
    from align.models.loading import resolve_name

    local = Path(resolve_name(name_or_path)) / "config.json"
    if local.is_file():
        return json.loads(local.read_text())
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name_or_path, "config.json")
    except Exception:  # noqa: BLE001 - not a hub id (a missing path): the shipped shapes, then the error below
        cached = None
    if isinstance(cached, str) and Path(cached).is_file():
        return json.loads(Path(cached).read_text())
    shipped = json.loads(SHIPPED.read_text())
    if name_or_path in shipped:
        return shipped[name_or_path]
    raise ShapeUnknown(f"no config.json for {name_or_path!r}: not a local folder, not in the hub cache, and not one "
                       f"of the shapes align ships ({', '.join(sorted(shipped))}). Give model.name_or_path a local "
                       "folder with its config.json (the weights are not read)")


def shape_of(name_or_path: str) -> Shape:
    config = config_dict(name_or_path)
    if config.get("model_type") in FORMULA_TYPES:
        return formula_shape(name_or_path, config)
    return meta_shape(name_or_path, config)


def _dims(c: dict) -> tuple[int, int, int, int, int, int, int]:
    h, a = c["hidden_size"], c["num_attention_heads"]
    d = c.get("head_dim") or h // a
    return h, a, c.get("num_key_value_heads") or a, d, c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]


def formula_shape(name: str, c: dict) -> Shape:
    """Exact counts of a Llama-style decoder: attention q/k/v/o, a gated MLP, RMSNorms (Gemma 2: four per layer;
    Qwen3: q/k norms), biases as each family has them."""
    kind = c["model_type"]
    h, a, kv, d, i, vocab, n = _dims(c)
    lin = [(h, a * d), (h, kv * d), (h, kv * d), (a * d, h), (h, i), (h, i), (i, h)]
    qkv_bias = kind == "qwen2" or c.get("attention_bias", False)
    bias = (a * d + 2 * kv * d if qkv_bias else 0) + (h if c.get("attention_bias", False) and kind != "qwen2" else 0)
    bias += (2 * i + h) if c.get("mlp_bias", False) else 0
    norms = {"gemma2": 4 * h, "qwen3": 2 * h + 2 * d}.get(kind, 2 * h)
    layer = sum(x * y for x, y in lin) + bias + norms
    tied = c.get("tie_word_embeddings", kind.startswith("gemma"))
    params = vocab * h * (1 if tied else 2) + n * layer + h
    return Shape(name, kind, h, n, a, kv, d, i, vocab, bool(tied), params, layer,
                 n * sum(x * y for x, y in lin), tuple(lin))


def meta_shape(name: str, c: dict) -> Shape:
    """Any other architecture: transformers' model built on the meta device with one and two layers (no memory,
    no weights), the per-layer count their difference."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    def build(layers: int):
        config = AutoConfig.for_model(**{**c, "num_hidden_layers": layers})
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)

    one, two = build(1), build(2)
    count = [sum(p.numel() for p in m.parameters()) for m in (one, two)]
    layer = count[1] - count[0]
    h, a, kv, d, i, vocab, n = _dims(c)
    block = next(m for name_, m in two.named_modules() if name_.endswith("layers.0"))
    lin = tuple((m.in_features, m.out_features) for m in block.modules() if isinstance(m, torch.nn.Linear))
    tied = bool(c.get("tie_word_embeddings", False))
    return Shape(name, c.get("model_type", "?"), h, n, a, kv, d, i, vocab, tied, count[0] + (n - 1) * layer, layer,
                 n * sum(x * y for x, y in lin), lin)
