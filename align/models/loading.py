"""Loading models: hub id, local directory, the builtin tiny model, or a stage's output (full or adapter).

A stage that starts from an adapter directory loads its base and merges the adapter in, so the
new stage trains on what the previous stage produced (and a fresh LoRA on top of it is never a
no-op stacked on a frozen copy).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch

from align.models.tiny import BUILTIN_PREFIX, tiny_model_dir

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_name(name_or_path: str) -> str:
    if name_or_path.startswith(BUILTIN_PREFIX):
        name = name_or_path[len(BUILTIN_PREFIX):]
        if name != "tiny":
            raise ValueError(f"unknown builtin model {name_or_path!r}; the builtin model is builtin:tiny")
        return str(tiny_model_dir())
    return name_or_path


def is_builtin_tiny(name_or_path: str) -> bool:
    return name_or_path == f"{BUILTIN_PREFIX}tiny"


def resolve_dtype(name: str) -> torch.dtype:
    """`auto`: bf16 on a GPU that supports it, fp16 on an older GPU, fp32 on CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in DTYPES:
        raise ValueError(f"model.dtype must be auto, {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]


class ModelLoadError(ValueError):
    """A local model folder whose weights do not load: the folder, the file and the reason (exit code 2)."""


def broken_weight_file(folder: Path) -> tuple[Path, str] | None:
    """The first weight file of `folder` that does not open, with the reason; None when all open (or none is there)."""
    from safetensors import safe_open

    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    f.get_slice(key)
        except Exception as e:  # noqa: BLE001 - any failure to read the file is the answer
            return path, f"{type(e).__name__}: {e}"
    return None


def from_pretrained(auto_cls, source: str, **kwargs):
    """`auto_cls.from_pretrained(source)`; a local folder whose weights fail to load raises ModelLoadError naming the
    folder, the file and the reason instead of a loader's traceback."""
    try:
        return auto_cls.from_pretrained(source, **kwargs)
    except Exception as e:
        folder = Path(source)
        if not folder.is_dir():
            raise
        broken = broken_weight_file(folder)
        if broken is not None:
            path, reason = broken
            raise ModelLoadError(f"{folder}: the model's weights do not load: {path.name} is unreadable ({reason}). "
                                 "Fix: copy or download that file again, or point model.name_or_path (or the stage's "
                                 "init) at a complete model folder") from e
        if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")) and not (
                folder / "adapter_config.json").is_file():
            raise ModelLoadError(f"{folder}: holds no model weights (no *.safetensors or *.bin file): "
                                 f"{type(e).__name__}: {e}") from e
        raise


def adapter_base(path: str | Path) -> str | None:
    """The base model an adapter directory names, or None when `path` is not an adapter."""
    cfg = Path(path) / "adapter_config.json"
    if cfg.is_file():
        return json.loads(cfg.read_text())["base_model_name_or_path"]
    return None


def load_tokenizer(source: str, model_cfg):
    from transformers import AutoTokenizer

    from align.data.chat import ensure_chat_template

    tokenizer = AutoTokenizer.from_pretrained(
        source, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
    )
    ensure_chat_template(tokenizer)
    return tokenizer


PEFT_METHODS = ("none", "lora", "qlora")


def peft_problems(peft_cfg) -> list[str]:
    """What is wrong with the `peft` section's names and values, each with the allowed ones."""
    if peft_cfg.method not in PEFT_METHODS:
        return [f"peft.method must be none, lora or qlora; got {peft_cfg.method!r}"]
    out = []
    if peft_cfg.method == "qlora":
        q = peft_cfg.quant
        if q.bits not in (4, 8):
            out.append(f"peft.quant.bits must be 4 or 8; got {q.bits}")
        if q.compute_dtype != "auto" and q.compute_dtype not in DTYPES:
            out.append(f"peft.quant.compute_dtype must be auto, {', '.join(DTYPES)}; got {q.compute_dtype!r}")
    return out


def check_peft(peft_cfg) -> None:
    problems = peft_problems(peft_cfg)
    if problems:
        raise ValueError("; ".join(problems))


def exact_cpu_4bit_kernels() -> None:
    """Keep bitsandbytes' 4-bit layers on their fp32 CPU path.

    On CPUs with AVX512-BF16, bitsandbytes repacks a Linear4bit's weights at its first no-grad eval forward
    and computes in bf16 from then on; repacking is undone at save, lossily. Measured here (AMD EPYC,
    bitsandbytes 0.50.2): a QLoRA adapter reloaded that way gave logits 2.5e-3 away from the trained model
    (1e-7 on the fp32 path), and training, evaluation and reload numbers depended on the CPU model. Applies
    to the 4-bit layers built after this call (align builds every quantized model through
    quantization_config)."""
    import bitsandbytes.nn.modules as bnb_modules

    bnb_modules.has_avx512bf16 = lambda: False


def quantization_config(peft_cfg, dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    check_peft(peft_cfg)
    if not torch.cuda.is_available():
        exact_cpu_4bit_kernels()
    q = peft_cfg.quant
    compute = dtype if q.compute_dtype == "auto" else DTYPES[q.compute_dtype]
    if q.bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=q.quant_type,
            bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_quant_storage=compute,
        )
    return BitsAndBytesConfig(load_in_8bit=True)  # bits is 4 or 8 (check_peft)


def load_merged(auto_cls, source: str, **kwargs):
    """`source` as plain weights. An adapter directory is loaded onto the base it names and merged;
    that base may itself be an adapter (a LoRA stage trained on a LoRA stage), merged the same way."""
    base = adapter_base(source)
    if base is None:
        return from_pretrained(auto_cls, resolve_name(source), **kwargs)
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    model = load_merged(auto_cls, base, **kwargs)
    config = PeftConfig.from_pretrained(source)
    if auto_cls is not AutoModelForCausalLM:
        # PEFT picks its wrapper class from the adapter's task type: a causal-LM adapter (an SFT stage's) on a
        # sequence classifier (the RM built from it) would get the generation wrapper, which needs methods the
        # classifier lacks. The plain wrapper loads the same LoRA weights into the shared backbone.
        config.task_type = None
    model = PeftModel.from_pretrained(model, source, config=config).merge_and_unload()
    return model.requires_grad_(True)  # PEFT froze the base for the adapter; merged, it is plain weights again


def load_pretrained(auto_cls, source: str, model_cfg, peft_cfg, **kwargs):
    """Load `source` with `auto_cls`; an adapter directory (or chain of them) is merged into its base."""
    dtype = resolve_dtype(model_cfg.dtype)
    common = dict(
        revision=model_cfg.revision,
        trust_remote_code=model_cfg.trust_remote_code,
        dtype=dtype,
        **kwargs,
    )
    if model_cfg.attn_implementation:
        common["attn_implementation"] = model_cfg.attn_implementation
    quantized = peft_cfg.method == "qlora"
    if adapter_base(source) is not None:
        if quantized or zero3_loading():
            quant = quantization_config(peft_cfg, dtype) if quantized else None
            return _from_merged_folder(auto_cls, source, common, quant)
        return load_merged(auto_cls, source, **common)
    if quantized:
        common["quantization_config"] = quantization_config(peft_cfg, dtype)
    return from_pretrained(auto_cls, resolve_name(source), **common)


def zero3_loading() -> bool:
    """Whether transformers builds models partitioned now (a ZeRO-3 config is registered, as TRL's trainers'
    arguments do): merging an adapter into such a model meets empty local shards."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


@contextmanager
def whole_weights():
    """Models built inside are whole, not ZeRO-3 partitioned (transformers' ZeRO-3 config unregistered meanwhile)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = ref


def _from_merged_folder(auto_cls, source: str, common: dict, quant=None):
    """A stage on a LoRA/QLoRA parent when the merge cannot happen in the model being built: the parent's adapter
    chain is merged into its base in full weights, written to a folder, and the model loaded from there, quantized
    4/8-bit by bitsandbytes (`quant`, QLoRA: it quantizes while loading from disk) or partitioned by ZeRO-3 as it
    loads (merging into partitioned weights fails). On several ranks one process per machine (local rank 0)
    merges and writes; the others wait and read the same folder, so the whole model is held once per machine, not
    once per rank. Needs the merged model's size in free disk under ALIGN_CACHE for the time of the load; the
    folder is removed after it."""
    import hashlib
    import os
    import shutil
    import socket
    import tempfile

    from align.config.paths import cache_root
    from align.models import distributed

    root = cache_root() / "merged-parents"
    root.mkdir(parents=True, exist_ok=True)
    shared = distributed.is_initialized() and distributed.world_size() > 1
    if shared:  # the same name on every rank of this job on this machine
        key = "|".join([str(Path(source).resolve()), auto_cls.__name__, socket.gethostname(),
                        os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")])
        folder = root / hashlib.sha1(key.encode()).hexdigest()[:16]
        writer = int(os.environ.get("LOCAL_RANK", "0")) == 0
    else:
        folder, writer = Path(tempfile.mkdtemp(dir=root)), True
    try:
        if writer:
            staged = folder.with_name(folder.name + ".partial")
            shutil.rmtree(staged, ignore_errors=True)
            with whole_weights():
                merged = load_merged(auto_cls, source, **common)
            merged.save_pretrained(staged)
            del merged
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(staged, folder)
        if shared:
            distributed.barrier()
        kwargs = dict(common, **({"quantization_config": quant} if quant is not None else {}))
        model = from_pretrained(auto_cls, str(folder), **kwargs)
        if shared:
            distributed.barrier()  # every rank has read it before it goes
        return model
    finally:
        if writer:
            shutil.rmtree(folder, ignore_errors=True)


def point_adapter_at(model, base: str) -> None:
    """Record `base` (the parent stage's model) as the base of the adapter about to be saved.

    After a parent adapter was merged in memory, PEFT would otherwise name the parent's own base,
    and loading the new adapter there would silently drop what the parent stage learned. A local folder is
    recorded as an absolute path: with the default `run.root=runs` it was `runs/<run>/sft/model`, which PEFT,
    plain transformers and align read relative to the directory they run in, so the adapter did not load from
    anywhere but the one the run started in."""
    if os.path.isdir(base):
        base = os.path.abspath(base)
    for config in getattr(model, "peft_config", {}).values():
        config.base_model_name_or_path = base


def lora_config(peft_cfg, task_type: str, modules_to_save=None):
    from peft import LoraConfig

    targets = peft_cfg.target_modules
    if not isinstance(targets, str):
        targets = list(targets)
    return LoraConfig(
        r=peft_cfg.r,
        lora_alpha=peft_cfg.alpha,
        lora_dropout=peft_cfg.dropout,
        target_modules=targets,
        task_type=task_type,
        modules_to_save=modules_to_save,
    )


def wrap_peft(model, peft_cfg, model_cfg, task_type: str = "CAUSAL_LM", modules_to_save=None):
    """Wrap in LoRA for peft=lora|qlora (k-bit preparation for qlora); return the model unchanged for none."""
    check_peft(peft_cfg)
    if peft_cfg.method == "none":
        return model
    from peft import get_peft_model, prepare_model_for_kbit_training

    if peft_cfg.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=model_cfg.gradient_checkpointing)
    return get_peft_model(model, lora_config(peft_cfg, task_type, modules_to_save))


def cast_trainable(model) -> None:
    """QLoRA: keep the trainable weights (adapters, a reward model's score head) in float32, whatever the compute
    dtype. PEFT's k-bit preparation upcasts the base's norms (and heads) to float32, so in bf16 the activations
    reaching a trained score head are float32: TRL casts trainable weights to bf16, and the head's matmul failed
    ("expected m1 and m2 to have the same dtype"). float32 adapters are also what PEFT reloads onto a quantized
    base (it cannot keep bf16 ones there, peft#2889), so the reloaded model is the trained one. LoRA layers cast
    their input to the adapter's dtype and the result back."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32 and param.is_floating_point():
            param.data = param.data.to(torch.float32)


def set_use_cache(model, enabled: bool) -> None:
    """Off while training: with a KV cache, transformers skips packed-sequence detection and packed
    (padding-free) examples attend to each other. On again for the saved model, for generation."""
    model.config.use_cache = enabled
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.use_cache = enabled


def load_causal_lm(source: str, model_cfg, peft_cfg):
    from transformers import AutoModelForCausalLM

    model = load_pretrained(AutoModelForCausalLM, source, model_cfg, peft_cfg)
    set_use_cache(model, False)
    return wrap_peft(model, peft_cfg, model_cfg)


def load_for_adapter_trainer(source: str, model_cfg, peft_cfg):
    """(model, LoraConfig or None) for trainers that attach the adapter themselves (DPO): with a fresh
    adapter the trainer's reference is the same weights with the adapter switched off."""
    from transformers import AutoModelForCausalLM

    model = load_pretrained(AutoModelForCausalLM, source, model_cfg, peft_cfg)
    set_use_cache(model, False)
    check_peft(peft_cfg)
    if peft_cfg.method == "none":
        return model, None
    if peft_cfg.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=model_cfg.gradient_checkpointing)
    return model, lora_config(peft_cfg, "CAUSAL_LM")


def describe(model) -> str:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{total / 1e6:.2f}M parameters, {trainable / 1e6:.2f}M trainable"


def load_reward_model(source: str, model_cfg, peft_cfg, pad_token_id: int):
    """A one-output sequence classifier (the score head); LoRA keeps the head trainable and saved."""
    from transformers import AutoModelForSequenceClassification

    model = load_pretrained(AutoModelForSequenceClassification, source, model_cfg, peft_cfg, num_labels=1)
    model.config.pad_token_id = pad_token_id
    return wrap_peft(model, peft_cfg, model_cfg, task_type="SEQ_CLS", modules_to_save=["score"])
