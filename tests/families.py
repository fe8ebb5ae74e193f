"""Model fixtures shaped like the families users bring, built from a fixed seed into a local directory
exactly like a hub checkout (config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
chat template), and loaded through the normal `model.name_or_path=DIR` path.

Each has a byte-level BPE with real merges trained on the bundled demo data (`tokenizers`), tiny random
weights, and its family's conventions, written from the families' public formats:
- chatml: Qwen2 architecture, grouped-query attention, ChatML with a default system turn and a newline
  after <|im_end|>, pad <|endoftext|> distinct from EOS <|im_end|>.
- llama3: Llama architecture, header template, BOS added by the template *and* the tokenizer's
  post-processor, EOS <|eot_id|>, no pad token.
- mistral: [INST] blocks, no system role, BOS <s>, EOS </s>, no pad token.
- base: no chat template at all (align's fallback applies), EOS </s>, no pad token.
"""

from __future__ import annotations

import json
from pathlib import Path

FAMILIES = ("chatml", "llama3", "mistral", "base")
VOCAB = 480

CHATML_TEMPLATE = (  # Qwen 2.5's handling of tool calls and tool turns (grouped into one user turn)
    "{%- if messages[0]['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' and message['tool_calls'] is defined and message['tool_calls'] -%}"
    "{{ '<|im_start|>assistant' }}{%- if message['content'] -%}{{ '\\n' + message['content'] }}{%- endif -%}"
    "{%- for call in message['tool_calls'] -%}"
    "{{ '\\n<tool_call>\\n{\"name\": \"' + call['function']['name'] + '\", \"arguments\": ' }}"
    "{{ call['function']['arguments'] | tojson }}{{ '}\\n</tool_call>' }}"
    "{%- endfor -%}{{ '<|im_end|>\\n' }}"
    "{%- elif message['role'] == 'tool' -%}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' -%}{{ '<|im_start|>user' }}{%- endif -%}"
    "{{ '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' -%}{{ '<|im_end|>\\n' }}{%- endif -%}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
LLAMA3_TEMPLATE = (  # Llama 3.1's: tool results in an `ipython` turn
    "{{- bos_token }}"
    "{%- for message in messages -%}"
    "{%- set role = 'ipython' if message['role'] == 'tool' else message['role'] -%}"
    "{{ '<|start_header_id|>' + role + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
)
MISTRAL_TEMPLATE = (  # v0.3's: [TOOL_CALLS] and [TOOL_RESULTS] blocks (plain text in this small vocabulary)
    "{{- bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' and message['tool_calls'] is defined and message['tool_calls'] -%}"
    "{{ '[TOOL_CALLS] ' }}{{ message['tool_calls'] | map(attribute='function') | list | tojson }}{{ eos_token }}"
    "{%- elif message['role'] == 'assistant' -%}{{ message['content'] + eos_token }}"
    "{%- elif message['role'] == 'tool' -%}{{ '[TOOL_RESULTS] ' + message['content'] + ' [/TOOL_RESULTS]' }}"
    "{%- else -%}{{ raise_exception('Only user, assistant and tool roles are supported') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

SPEC = {
    "chatml": dict(arch="qwen2", specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], bos=None,
                   eos="<|im_end|>", pad="<|endoftext|>", template=CHATML_TEMPLATE, post_bos=False),
    "llama3": dict(arch="llama", specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                           "<|end_header_id|>", "<|eot_id|>"],
                   bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None, template=LLAMA3_TEMPLATE, post_bos=True),
    "mistral": dict(arch="mistral", specials=["<unk>", "<s>", "</s>"], bos="<s>", eos="</s>", pad=None,
                    template=MISTRAL_TEMPLATE, post_bos=True),
    "base": dict(arch="llama", specials=["<s>", "</s>"], bos="<s>", eos="</s>", pad=None, template=None,
                 post_bos=True),
}


def _corpus() -> list[str]:
    from align.tasks import demo
    texts = []
    for split in ("sft", "prefs"):
        for line in demo.path(split).read_text().splitlines()[:3000]:
            row = json.loads(line)
            texts += [str(v) for v in row.values() if isinstance(v, str)]
            texts += [m["content"] for m in row.get("messages", []) if isinstance(m, dict)]
    return texts + ["You are a helpful assistant.", "system user assistant"]


def build_tokenizer(family: str, vocab_size: int = VOCAB):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    spec = SPEC[family]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=spec["specials"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(_corpus(), trainer)
    if spec["post_bos"]:
        bos = spec["bos"]
        core.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, core.token_to_id(bos))])
    else:
        core.post_processor = processors.ByteLevel(trim_offsets=False)
    tokens = {"eos_token": spec["eos"]}
    if spec["bos"]:
        tokens["bos_token"] = spec["bos"]
    if spec["pad"]:
        tokens["pad_token"] = spec["pad"]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, **tokens)
    tokenizer.add_special_tokens({"additional_special_tokens": [t for t in spec["specials"] if t not in tokens.values()]})
    if spec["template"]:
        tokenizer.chat_template = spec["template"]
    tokenizer.model_max_length = 512
    return tokenizer


def build(family: str, out: Path, vocab_size: int = VOCAB, seed: int = 0, **shape) -> Path:
    """Write the fixture model of `family` into `out` (a hub-like checkout) and return it. A `vocab_size` above
    the tokenizer's (Qwen 2.5's 151,936) pads the embeddings and output layer, as the real checkpoints do; `shape`
    overrides the config's sizes."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = SPEC[family]
    tokenizer = build_tokenizer(family, min(vocab_size, VOCAB))
    vocab = max(len(tokenizer), vocab_size)
    sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512)
    config = AutoConfig.for_model(
        spec["arch"], vocab_size=vocab, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **{**sizes, **shape})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
