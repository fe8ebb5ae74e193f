"""Packed SFT batches that do not pay for attention across examples.

TRL's packing (best-fit decreasing, `trl.data_utils.pack_dataset`) fills `train.max_length` rows with
whole examples; its padding-free collator then flattens the whole batch into ONE sequence. That is
right for varlen attention kernels (flash attention reads the sequence boundaries), but with SDPA or
eager attention transformers builds a dense block-diagonal mask over that sequence: a batch of B rows
of L tokens costs (B*L)^2 attention and mask memory, most of it masked out. On the demo (16 rows of
64 tokens) that made packed training slower per token than plain padded batches.

`RowPackedCollator` keeps the rows: a [B, L] batch whose position ids restart at every example. With
no attention mask, transformers reads the restarts as sequence boundaries and masks each row
block-diagonally, so attention costs B*L^2 and no example sees another. A row's padded tail gets its
own restarting positions (a separate, label-less sequence), so real tokens never attend to padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The collator's count of real (non-padding) tokens in a batch; RowPackedSFTTrainer takes it out of the
# inputs before the model sees them.
REAL_TOKENS = "align_real_tokens"

FLAT = "flat"  # one flattened sequence per batch (TRL's padding-free collator): varlen kernels
ROWS = "rows"  # [B, L] rows with restarting positions: every other attention implementation


def packed_layout(attn_implementation: str | None) -> str:
    """FLAT for attention implementations with a varlen path (flash attention and kernels built on it),
    ROWS otherwise (sdpa, eager, flex, None = transformers' default)."""
    return FLAT if attn_implementation and "flash" in attn_implementation else ROWS


def pack_rows(dataset, max_length: int):
    """Whole examples packed into rows of at most `max_length` tokens (TRL's best-fit decreasing); each
    row keeps its examples' lengths in `seq_lengths`."""
    from trl.data_utils import pack_dataset

    return pack_dataset(dataset.select_columns(["input_ids", "labels"]), max_length, "bfd")


@dataclass
class RowPackedCollator:
    """[B, L] batches of packed rows (or of single examples: the eval split is not packed)."""

    pad_token_id: int

    def __call__(self, examples: list[dict]) -> dict:
        width = max(len(e["input_ids"]) for e in examples)
        input_ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), width), -100, dtype=torch.long)
        position_ids = torch.empty((len(examples), width), dtype=torch.long)
        real = 0
        for i, example in enumerate(examples):
            n = len(example["input_ids"])
            real += n
            input_ids[i, :n] = torch.tensor(example["input_ids"])
            labels[i, :n] = torch.tensor(example["labels"])
            runs = list(example.get("seq_lengths") or [n])
            if sum(runs) != n:
                raise ValueError(f"packed row {i}: seq_lengths {runs} do not add up to its {n} tokens")
            if width > n:
                runs.append(width - n)  # the padded tail: its own sequence
            position_ids[i] = torch.cat([torch.arange(r) for r in runs])
        labels[position_ids == 0] = -100  # an example's first token is never predicted from the one before
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
                REAL_TOKENS: torch.tensor(real)}


def row_packed_trainer(sft_trainer_cls):
    """`sft_trainer_cls` (TRL's SFTTrainer) taking RowPackedCollator batches: the real-token count is taken
    out of the inputs, and TRL's `num_tokens` metric, which for a batch with position ids and no attention
    mask counts one row's width, is set from it instead."""

    class RowPackedSFTTrainer(sft_trainer_cls):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            real = inputs.pop(REAL_TOKENS)
            counted = self._total_train_tokens
            out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
            if self._total_train_tokens != counted:  # a training batch: TRL added the row width
                self._total_train_tokens = counted + int(self.accelerator.gather_for_metrics(real).sum().item())
                self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
            return out

    return RowPackedSFTTrainer
