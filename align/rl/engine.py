"""The models PPO trains (actor, critic) and the ones it only runs (reference, reward), on one
footing with or without DeepSpeed: trained models become DeepSpeed engines (ZeRO 1-3), frozen ones
are sharded inference engines under ZeRO-3 and plain replicas otherwise."""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from pathlib import Path

import torch

from align.models import distributed
from align.models.distributed import device

STATE_TAG = "state"  # DeepSpeed checkpoint tag
TRAINABLE_FILE = "trainable.safetensors"  # without DeepSpeed: the trained parameters (all, or the adapter)
OPTIM_FILE = "optimizer.pt"  # optimizer + scheduler state (tensors and numbers: loads with weights_only=True)


def unwrap(model):
    """The nn.Module under a DeepSpeed engine."""
    return getattr(model, "module", model)


class Trainable:
    """A model with its optimizer and schedule. backward() then step() per micro-batch; the optimizer
    steps every `grad_accum` micro-batches."""

    def __init__(self, model, *, lr: float, cfg, total_steps: int, ds_config: dict | None,
                 max_grad_norm: float | None = None):
        from transformers import get_scheduler

        t = cfg.train
        clip = t.max_grad_norm if max_grad_norm is None else max_grad_norm
        self.grad_accum, self.max_grad_norm, self.micro = t.grad_accum, clip, 0
        params = [p for p in model.parameters() if p.requires_grad]

        def schedule(optimizer):
            return get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=int(t.warmup_ratio * total_steps),
                                 num_training_steps=total_steps)

        if ds_config is not None:
            import deepspeed

            config = distributed.fill_auto(ds_config, micro_batch=t.batch_size, grad_accum=t.grad_accum,
                                           max_grad_norm=clip, dtype=next(model.parameters()).dtype,
                                           lr=lr, weight_decay=t.weight_decay,
                                           hidden_size=getattr(model.config, "hidden_size", None))
            optimizer = None if "optimizer" in config else torch.optim.AdamW(params, lr=lr,
                                                                             weight_decay=t.weight_decay)
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model, model_parameters=params, optimizer=optimizer, lr_scheduler=schedule, config=config)
            self.model = self.engine
        else:
            self.engine = None
            self.model = model.to(device())
            self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=t.weight_decay)
            self.scheduler = schedule(self.optimizer)
        self.params = params
        self.after_step: list = []  # called after every DeepSpeed step (gather.gathered_unhooked)

    @property
    def module(self):
        return unwrap(self.model)

    def backward(self, loss: torch.Tensor) -> None:
        if self.engine is not None:
            self.engine.backward(loss)
        else:
            (loss / self.grad_accum).backward()

    @property
    def updates(self) -> int:
        """Optimizer steps taken in this process (an inference engine holding the weights of an older one is
        stale)."""
        return self.micro // self.grad_accum

    def step(self) -> None:
        if self.engine is not None:
            self.engine.step()  # DeepSpeed applies the update at accumulation boundaries
            self.micro += 1
            for fn in self.after_step:
                fn()
            return
        self.micro += 1
        if self.micro % self.grad_accum == 0:
            if self.max_grad_norm:  # 0: no clipping, as train.max_grad_norm documents
                torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # --- resumable state: weights being trained, optimizer, schedule ----------------------------
    def save_state(self, folder, main: bool) -> None:
        """Every rank calls it (DeepSpeed's checkpoint is a collective; each rank writes its shards)."""
        folder = Path(folder)
        if self.engine is not None:
            self.engine.save_checkpoint(str(folder), tag=STATE_TAG)
            return
        if main:
            from safetensors.torch import save_file

            folder.mkdir(parents=True, exist_ok=True)
            save_file({n: p.detach().cpu().contiguous() for n, p in self.module.named_parameters() if p.requires_grad},
                      str(folder / TRAINABLE_FILE))
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "micro": self.micro}, folder / OPTIM_FILE)

    def load_state(self, folder) -> None:
        folder = Path(folder)
        if self.engine is not None:
            path, _ = self.engine.load_checkpoint(str(folder), tag=STATE_TAG, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
            if path is None:
                raise FileNotFoundError(f"no DeepSpeed checkpoint in {folder}")
            return
        from safetensors.torch import load_file

        weights = load_file(str(folder / TRAINABLE_FILE))
        expected = {n for n, p in self.module.named_parameters() if p.requires_grad}
        if set(weights) != expected:
            raise ValueError(f"{folder / TRAINABLE_FILE} does not match the model being trained "
                             f"({len(set(weights) ^ expected)} parameter names differ)")
        self.module.load_state_dict(weights, strict=False)
        state = torch.load(folder / OPTIM_FILE, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.micro = state["micro"]

    def state_dict_for_save(self):
        """Full weights on every rank under ZeRO-3 (a collective: all ranks call it); None otherwise."""
        if self.engine is not None and self.engine.zero_optimization_stage() == 3:
            return self.engine._zero3_consolidated_16bit_state_dict()
        return None


def frozen_engine_config(cfg, ds_config: dict, dtype, hidden_size, on_cpu: bool) -> dict:
    """The ZeRO-3 inference config of a frozen model: the run's sharding without an optimizer; `on_cpu`
    keeps the shards in CPU memory (parameter offload), fetched layer by layer as the forward needs them."""
    zero = dict(ds_config["zero_optimization"])
    zero.pop("offload_optimizer", None)
    if on_cpu:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return distributed.fill_auto(
        {"train_micro_batch_size_per_gpu": "auto", "zero_optimization": zero,
         "bf16": ds_config.get("bf16", {"enabled": False}), "fp16": ds_config.get("fp16", {"enabled": False})},
        micro_batch=cfg.train.batch_size, grad_accum=1, max_grad_norm=1.0, dtype=dtype, lr=0.0, weight_decay=0.0,
        hidden_size=hidden_size)


_FROZEN_ENGINES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # frozen() module -> its ZeRO-3 engine


def frozen_engine(module):
    """The ZeRO-3 inference engine frozen() made for `module`; None when it made none."""
    return _FROZEN_ENGINES.get(module)


def frozen(model, cfg, ds_config: dict | None, on_cpu: bool = False):
    """A model that is only run: eval mode, no grads; sharded by DeepSpeed under ZeRO-3. `on_cpu`: its
    weights stay in CPU memory (offloaded shards under ZeRO-3; otherwise the model runs on the CPU)."""
    model.requires_grad_(False)
    model.eval()
    if ds_config is not None and ds_config["zero_optimization"]["stage"] == 3:
        import deepspeed

        config = frozen_engine_config(cfg, ds_config, next(model.parameters()).dtype,
                                      getattr(model.config, "hidden_size", None), on_cpu)
        engine, *_ = deepspeed.initialize(model=model, config=config)
        engine.eval()
        _FROZEN_ENGINES[engine.module] = engine
        return engine.module
    return model.to("cpu" if on_cpu else device())


def enable_checkpointing(model) -> None:
    """Activation checkpointing for a model PPO trains: each decoder layer keeps only its input and
    recomputes the rest in backward (non-reentrant, so a frozen base under LoRA needs no input grads)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under a PEFT wrapper
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


@contextmanager
def checkpointing_active(*models):
    """transformers checkpoints a layer only in training mode, and PPO keeps its models in eval mode (no
    dropout: the first update must reproduce the rollout's log-probs). For the update's forward passes the
    checkpointed layers alone are flagged as training — dropout inside them stays off — and the flag is
    cleared again for rollouts, which need the KV cache that checkpointing turns off."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for model in models for m in unwrap(model).modules()
              if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    for layer in layers:
        layer.training = True  # the attribute only: .train() would switch on the dropout modules inside
    try:
        yield
    finally:
        for layer in layers:
            layer.training = False


def frozen_reward_model(cfg, ds_config, parent, pad_id: int):
    """The reward model of a stage output (a sequence classifier), frozen: sharded under ZeRO-3, its weights in CPU
    memory with stage.frozen_device=cpu."""
    from omegaconf import OmegaConf
    from transformers import AutoModelForSequenceClassification

    from align.models.loading import load_pretrained

    model = load_pretrained(AutoModelForSequenceClassification, str(parent.model), cfg.model,
                            OmegaConf.create({"method": "none"}), num_labels=1)
    model.config.pad_token_id = pad_id
    return frozen(model, cfg, ds_config, cfg.stage.get("frozen_device") == "cpu")
