"""The floor for bench/dpo.py: a bare PyTorch DPO loop (sigmoid loss, beta 0.1) over the demo pairs as
align tokenizes them (`dpo_datasets`), the same tiny model and learning rate: the reference's log-probs
computed once up front (no reference model in the loop), then policy forward on chosen and rejected in one
batch, loss, AdamW. No Trainer, no logging. Prints {"steps_per_s", "steps", "runtime_s", "precompute_s"}:
steps over the loop's own time; the precompute is timed apart (and counted in the process's wall time)."""

import json
import time


def main():
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from common import cli, tiny_setup

    args = cli(__doc__)
    cfg, tokenizer, tiny_model_dir = tiny_setup("stage=dpo")
    from align.data.loader import dpo_datasets

    torch.manual_seed(0)
    train_ds, _, _ = dpo_datasets(cfg.data, tokenizer, cfg.train.max_length, cfg.train.seed)
    pad = tokenizer.pad_token_id

    def batch_of(rows):
        """[2B, L]: the chosen sequences, then the rejected ones; a mask of the answer tokens."""
        seqs = [r["prompt_ids"] + r["chosen_ids"] for r in rows] + [r["prompt_ids"] + r["rejected_ids"] for r in rows]
        starts = [len(r["prompt_ids"]) for r in rows] * 2
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), pad)
        attn = torch.zeros((len(seqs), width), dtype=torch.long)
        answer = torch.zeros((len(seqs), width), dtype=torch.bool)
        for i, (s, p) in enumerate(zip(seqs, starts)):
            ids[i, :len(s)] = torch.tensor(s)
            attn[i, :len(s)] = 1
            answer[i, p:len(s)] = True
        return ids, attn, answer

    def logps(model, ids, attn, answer):
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
        token = torch.gather(logits.log_softmax(-1), 2, ids[:, 1:, None]).squeeze(2)
        return (token * answer[:, 1:]).sum(-1)

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    rows = [train_ds[i] for i in range(len(train_ds))]
    order = torch.randperm(len(rows)).tolist()
    batches = [[rows[j] for j in order[i:i + args.batch_size]] for i in range(0, len(rows), args.batch_size)]
    batches = [batch_of(b) for b in batches if len(b) == args.batch_size]
    t0 = time.perf_counter()
    model.eval()
    with torch.no_grad():
        reference = [logps(model, *b) for b in batches]  # every pair, as align and TRL precompute them
    precompute_s = time.perf_counter() - t0
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.0)
    t0 = time.perf_counter()
    for step in range(args.steps):
        i = step % len(batches)
        policy = logps(model, *batches[i])
        half = policy.shape[0] // 2
        ref = reference[i]
        margin = (policy[:half] - ref[:half]) - (policy[half:] - ref[half:])
        loss = -F.logsigmoid(0.1 * margin).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    runtime = time.perf_counter() - t0
    print(json.dumps({"steps_per_s": args.steps / runtime, "steps": args.steps, "runtime_s": runtime,
                      "precompute_s": precompute_s}))


if __name__ == "__main__":
    main()
