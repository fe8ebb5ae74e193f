"""Chat templates and encoding with labels on assistant tokens only.

Works with any chat template that renders a conversation as a growing prefix (Llama 3, Qwen 2.5,
Mistral, ChatML, the tiny model's): each assistant span is located as the text between the
rendering of the turns before it (with the generation prompt) and the rendering that includes it,
then mapped to tokens through the offset mapping. No ``{% generation %}`` markers are needed.
"""

from __future__ import annotations

from align.data.errors import RowProblem

IGNORE_INDEX = -100

# Used only for tokenizers that ship no chat template (base models); saved with the model.
DEFAULT_CHAT_TEMPLATE = (  # literal text in expressions: the whitespace control of the tags must not eat it
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '### Assistant:\\n' + message['content'] + eos_token + '\\n\\n' }}"
    "{%- else -%}"
    "{{ '### ' + message['role'] | capitalize + ':\\n' + message['content'] + '\\n\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '### Assistant:\\n' }}{%- endif -%}"
)


def ensure_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _per_tokenizer(tokenizer, key: str, compute):
    """`compute(tokenizer)` once per tokenizer object (encoding loops call these for every row)."""
    cache = tokenizer.__dict__.setdefault("_align_cache", {})
    if key not in cache:
        cache[key] = compute(tokenizer)
    return cache[key]


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer's own post-processor starts every encoding with BOS (Llama, Mistral, Gemma)."""
    bos = tokenizer.bos_token_id
    return bos is not None and _per_tokenizer(tokenizer, "adds_bos", lambda t: t("a")["input_ids"][:1] == [bos])


def tokenize(tokenizer, text: str, offsets: bool = False) -> dict:
    """Rendered chat text as ids with exactly one BOS where the model family uses one: the template's own
    BOS is kept, and the tokenizer's is added only when the template wrote none (never twice)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=offsets)
    ids = list(enc["input_ids"])
    out = {"input_ids": ids}
    if offsets:
        out["offset_mapping"] = list(enc["offset_mapping"])
    if adds_bos(tokenizer) and ids[:1] != [tokenizer.bos_token_id]:
        out["input_ids"] = [tokenizer.bos_token_id, *ids]
        if offsets:
            out["offset_mapping"] = [(0, 0), *out["offset_mapping"]]
    return out


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans of every assistant turn (end-of-turn token included)."""
    full = render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        upto = render(tokenizer, messages[: i + 1])
        if not (full.startswith(upto) and upto.startswith(before)):
            raise RowProblem(
                "the model's chat template does not render conversations as a growing prefix",
                "use a model whose chat template does, or set a template with tokenizer.chat_template",
            )
        spans.append((len(before), _turn_end_in(tokenizer, full, len(before), len(upto))))
    return full, spans


def _turn_end_in(tokenizer, text: str, start: int, end: int) -> int:
    """Where the assistant turn text[start:end] ends: just after its last end-of-turn token, so template
    text that follows it (ChatML's newline) is not learned as part of the answer."""
    marks = [tokenizer.convert_ids_to_tokens(i) for i in end_of_turn_ids(tokenizer)]
    found = [at + len(m) for m in marks if m and (at := text.rfind(m, start, end)) >= 0]
    return max(found) if found else end


def encode_chat(tokenizer, messages: list[dict], max_length: int) -> dict:
    """input_ids and labels (-100 outside assistant turns), truncated to max_length from the end."""
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenize(tokenizer, text, offsets=True)
    ids = enc["input_ids"]
    supervised = [end > start and any(a <= start < b for a, b in spans) for start, end in enc["offset_mapping"]]
    if not any(supervised):
        raise RowProblem("no assistant token in the encoded conversation", "check the chat template")
    if not any(supervised[:max_length]):
        raise RowProblem(
            f"no supervised token left after truncation to train.max_length={max_length} "
            f"(the first answer token is token {supervised.index(True) + 1} of {len(ids)})",
            "raise train.max_length or shorten the prompt",
        )
    labels = [i if keep else IGNORE_INDEX for i, keep in zip(ids, supervised)]
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a prompt ready for generation (ends with the assistant header)."""
    return tokenize(tokenizer, render(tokenizer, messages, add_generation_prompt=True))["input_ids"]


def end_of_turn_ids(tokenizer) -> list[int]:
    """The tokens that end an assistant turn: EOS, and the special token the chat template writes right after
    an answer (ChatML's <|im_end|>, Llama 3's <|eot_id|>, Gemma's <end_of_turn>) when it is another one."""
    return _per_tokenizer(tokenizer, f"turn_end:{tokenizer.chat_template}", _end_of_turn_ids)


def _end_of_turn_ids(tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id} - {None}
    answer = "Zq7"
    text = render(tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": answer}])
    after = text[text.rfind(answer) + len(answer):]
    following = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    special = set(tokenizer.all_special_ids) | {i for t, i in tokenizer.get_added_vocab().items()}
    if following and following[0] in special:
        ids.add(following[0])
    return sorted(ids)


def scoring_pad_id(tokenizer) -> int | None:
    """A pad id for a reward model that no scored sequence ends with. transformers' sequence classifiers (and so
    TRL, OpenRLHF or a reward server loading the folder) score the last token that is not `config.pad_token_id`:
    with pad = EOS (Llama 3, Mistral) that is the token before the end of turn, not the one align trains and reads.
    The tokenizer's own pad when it is no end-of-turn token; else, in this order, its unknown token, a special
    token named as padding, BOS, another special token; None when every special token ends turns."""
    stops = set(end_of_turn_ids(tokenizer))
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in stops:
        return tokenizer.pad_token_id
    added = {t: i for t, i in tokenizer.get_added_vocab().items()}
    special = sorted(set(tokenizer.all_special_ids) | {i for t, i in added.items()
                                                      if str(t).startswith("<") and str(t).endswith(">")})
    named_pad = [i for t, i in sorted(added.items(), key=lambda x: x[1]) if "pad" in str(t).lower()]
    for candidate in (tokenizer.unk_token_id, *named_pad, tokenizer.bos_token_id, *special):
        if candidate is not None and candidate not in stops:
            return candidate
    return None


def cut_after_turn_end(ids: list[int], turn_end: list[int]) -> list[int]:
    """`ids` up to and including its last end-of-turn token: template text after it (ChatML's newline, the
    fallback template's blank line) is not part of what a reward model scores."""
    for i in range(len(ids) - 1, -1, -1):
        if ids[i] in turn_end:
            return ids[: i + 1]
    return ids


def encode_pair(tokenizer, row: dict, max_length: int) -> dict:
    """Token ids of prompt+chosen and prompt+rejected for a reward model, each ending at the end-of-turn
    token of its answer (where PPO and the eval stage score a generated response), truncated to max_length."""
    prompt_len = len(encode_prompt(tokenizer, row["prompt"])) if row["prompt"] else 0
    if prompt_len >= max_length:
        raise RowProblem(
            f"the prompt alone is {prompt_len} tokens, over train.max_length={max_length}",
            "raise train.max_length or shorten the prompt",
        )
    out, turn_end = {}, end_of_turn_ids(tokenizer)
    for key in ("chosen", "rejected"):
        text = render(tokenizer, row["prompt"] + row[key])
        ids = cut_after_turn_end(tokenize(tokenizer, text)["input_ids"], turn_end)
        out[f"{key}_ids"] = ids[:max_length]
    if out["chosen_ids"] == out["rejected_ids"]:
        raise RowProblem(f"chosen and rejected are identical after truncation to train.max_length={max_length}",
                         "raise train.max_length")
    if row.get("margin") is not None:
        out["margin"] = row["margin"]
    return out


def encode_prompt_completions(tokenizer, row: dict, max_length: int, keys: tuple = ("chosen", "rejected")) -> dict:
    """prompt_ids and <key>_ids (chosen_ids, rejected_ids for DPO): the completions are what follows the shared
    prompt tokens (the end-of-turn token included), cut so prompt + completion fits max_length."""
    if not row["prompt"]:
        raise RowProblem("the row has no prompt (no turns before the answer)",
                         "give a `prompt` column, or conversations whose answer follows a user turn")
    prompt_ids = encode_prompt(tokenizer, row["prompt"])
    full = {key: tokenize(tokenizer, render(tokenizer, row["prompt"] + row[key]))["input_ids"] for key in keys}
    # tokenizers may merge across the prompt/answer boundary: keep the prefix both renderings share
    shared = min(common_prefix(prompt_ids, ids) for ids in full.values())
    if shared >= max_length:
        raise RowProblem(f"the prompt alone is {shared} tokens, over train.max_length={max_length}",
                         "raise train.max_length or shorten the prompt")
    out = {"prompt_ids": prompt_ids[:shared]}
    for key, ids in full.items():
        out[f"{key}_ids"] = ids[shared:max_length]
    if len(keys) == 2 and out[f"{keys[0]}_ids"] == out[f"{keys[1]}_ids"]:
        raise RowProblem(f"chosen and rejected are identical after truncation to train.max_length={max_length}",
                         "raise train.max_length")
    return out


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading ids `a` and `b` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
