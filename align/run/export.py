"""`python -m align export stage=<stage> run.name=<name>`: merge an adapter stage into a standalone model.

Writes `runs/<name>/<stage>/merged/` (atomically), loadable with plain `transformers`: a causal
LM, or for `rm` a one-output sequence classifier with its trained score head. A QLoRA adapter is
merged into the *dequantized* 4-bit base it was trained on, so the merged model scores like the
adapter did.
"""

from __future__ import annotations

import logging
import os
import shutil

from omegaconf import DictConfig, OmegaConf

from align.run import handoff
from align.models.loading import adapter_base, load_merged, quantization_config, resolve_dtype

log = logging.getLogger("align")
MERGED_DIR = "merged"


def run(cfg: DictConfig):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    out = handoff.stage_dir(cfg)
    if not handoff.is_complete(out):
        raise handoff.HandoffError(f"{out} is not a completed stage (no {handoff.STAGE_JSON}); nothing to export")
    info = handoff.read_stage_json(out)
    model_dir = out / handoff.MODEL_DIR
    base = adapter_base(model_dir)
    if base is None:
        print(f"{cfg.stage.name} holds full weights already: {model_dir} loads with transformers as is")
        return model_dir
    trained = OmegaConf.load(out / handoff.CONFIG_YAML)
    dtype = resolve_dtype(trained.model.dtype)
    kwargs = {"dtype": dtype}
    auto_cls = AutoModelForCausalLM
    if info.get("task") == "seq_cls":
        auto_cls, kwargs["num_labels"] = AutoModelForSequenceClassification, 1
    if info.get("weights") == "qlora":
        kwargs["quantization_config"] = quantization_config(trained.peft, dtype)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load_merged(auto_cls, base, **kwargs)
    if info.get("weights") == "qlora":
        model = model.dequantize()
        model.to(dtype)
    model.config.pad_token_id = tokenizer.pad_token_id
    merged = PeftModel.from_pretrained(model, model_dir).merge_and_unload()

    final = out / MERGED_DIR
    tmp = out / f".{MERGED_DIR}.new"
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    print(f"{cfg.stage.name}: merged {info.get('weights')} adapter into {base}: {final}")
    return final
