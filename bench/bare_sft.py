"""The floor for bench/sft.py: a bare PyTorch loop over the same packed batches align's SFT stage trains on
(align's loader, `pack_rows`, `RowPackedCollator`), the same tiny model, AdamW at the same learning rate,
no Trainer, no callbacks, no logging. Prints {"tokens_per_s", "tokens", "runtime_s", "steps"}: real
(non-pad) tokens over the loop's own time."""

import json
import time


def main():
    import torch
    from transformers import AutoModelForCausalLM

    from common import cli, tiny_setup

    args = cli(__doc__)
    cfg, tokenizer, tiny_model_dir = tiny_setup()  # the demo data group: max_length 64, as align's run
    length = cfg.train.max_length
    from align.data.loader import sft_datasets
    from align.data.packing import REAL_TOKENS, RowPackedCollator, pack_rows

    torch.manual_seed(0)
    train_ds, _, _ = sft_datasets(cfg.data, tokenizer, length, cfg.train.seed)
    rows = pack_rows(train_ds, length)
    collate = RowPackedCollator(tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    loader = torch.utils.data.DataLoader(rows, batch_size=args.batch_size, shuffle=True, collate_fn=collate)
    tokens, steps = 0, 0
    t0 = time.perf_counter()
    while steps < args.steps:
        for batch in loader:
            tokens += int(batch.pop(REAL_TOKENS))  # the collator's count of non-padding tokens
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            steps += 1
            if steps == args.steps:
                break
    runtime = time.perf_counter() - t0
    print(json.dumps({"tokens_per_s": tokens / runtime, "tokens": tokens, "runtime_s": runtime, "steps": steps}))


if __name__ == "__main__":
    main()
