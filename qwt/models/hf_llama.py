"""LLaMA models through transformers: real checkpoints (a local folder or the Hugging Face cache)
and the embedded LLaMA trained here (``model.source: hf_llama``).

Real models: ``model.path`` (a folder with config.json + weights, e.g. a downloaded
meta-llama/Meta-Llama-3-8B) or ``model.hf_id`` (looked up in the local hub cache only, never
downloaded by a run), loaded in ``model.dtype`` (float16 / bfloat16 / float32). The tokenizer comes
from the same place. Absent weights are a ConfigError naming the option and the fix.

Embedded (``model.embedded: true``): a small ``LlamaForCausalLM`` (``model.arch``: LlamaConfig
keywords) with a byte-level BPE tokenizer trained here with the ``tokenizers`` library on the
standard library's docstrings (``qwt/data/pydocs.py``). Both are trained once by
``python tools/train_embedded.py llama_embedded`` (``train``, below) and committed under
``qwt/models/weights/`` (``llama_embedded.pt`` fp16 + sidecar json, ``llama_embedded.tokenizer.json``).
"""
from __future__ import annotations

import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from .shipped import WEIGHTS_DIR, load_shipped

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}


def tokenizer_path(name: str):
    return WEIGHTS_DIR / f"{name}.tokenizer.json"


# ---------------------------------------------------------------------------------------------
# loading


def _source(model_cfg: dict) -> str:
    path, hf_id = model_cfg.get("path"), model_cfg.get("hf_id")
    if path and str(path) not in ("", "???"):
        if not os.path.isdir(str(path)) or not os.path.isfile(os.path.join(str(path), "config.json")):
            raise ConfigError(f"model.path={path} is not a model folder (config.json + weights): give the folder of a "
                              f"downloaded LlamaForCausalLM (e.g. huggingface-cli download {hf_id or 'meta-llama/Meta-Llama-3-8B'} --local-dir DIR)")
        return str(path)
    if hf_id:
        try:
            from huggingface_hub import snapshot_download

            return snapshot_download(str(hf_id), local_files_only=True)
        except Exception as e:
            raise ConfigError(f"model.hf_id={hf_id} is not in the local Hugging Face cache ({type(e).__name__}); runs never download: "
                              f"download it once (huggingface-cli download {hf_id}, gated models need `huggingface-cli login`) "
                              f"or set model.path=/folder/with/the/weights") from e
    raise ConfigError(f"model {model_cfg.get('name')}: set model.path=/folder/of/the/checkpoint or model.hf_id=<hub id in the local cache>")


def load_tokenizer(model_cfg: dict):
    """The model's tokenizer (a transformers fast tokenizer)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if model_cfg.get("embedded"):
        p = tokenizer_path(model_cfg["name"])
        if not p.is_file():
            raise ConfigError(f"the embedded tokenizer {p} is missing: train it with python tools/train_embedded.py {model_cfg['name']}")
        return PreTrainedTokenizerFast(tokenizer_file=str(p), **SPECIAL)
    tok = AutoTokenizer.from_pretrained(_source(model_cfg), use_fast=True, local_files_only=True)
    return tok


def build_llama(model_cfg: dict, log=print) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    if model_cfg.get("embedded"):
        state, meta = load_shipped(model_cfg["name"])
        model = LlamaForCausalLM(LlamaConfig(**embedded_config(model_cfg)))
        model.load_state_dict(state, strict=True)
        return model.float().eval()
    from transformers import AutoConfig, AutoModelForCausalLM

    src = _source(model_cfg)
    dtype = DTYPES.get(str(model_cfg.get("dtype", "float16")))
    if dtype is None:
        raise ConfigError(f"model.dtype={model_cfg.get('dtype')!r}: use one of {sorted(DTYPES)}")
    conf = AutoConfig.from_pretrained(src, local_files_only=True)
    if "LlamaForCausalLM" not in (conf.architectures or []) and conf.model_type != "llama":
        raise ConfigError(f"{src} holds a {conf.model_type} model ({conf.architectures}); this family needs a LlamaForCausalLM")
    log(f"[qwt] loading {src} in {dtype}")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, local_files_only=True,
                                                 attn_implementation=model_cfg.get("attn_implementation", "sdpa"))
    if not isinstance(model, LlamaForCausalLM):
        raise ConfigError(f"{src} loaded as {type(model).__name__}, not LlamaForCausalLM")
    return model.eval()


def embedded_config(model_cfg: dict) -> dict:
    a = dict(model_cfg["arch"])
    a.setdefault("tie_word_embeddings", False)
    a.update(bos_token_id=1, eos_token_id=2, pad_token_id=3)
    return a


# ---------------------------------------------------------------------------------------------
# the embedded model's training (explicit: tools/train_embedded.py llama_embedded)


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=SPECIAL["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=[SPECIAL["unk_token"], SPECIAL["bos_token"], SPECIAL["eos_token"], SPECIAL["pad_token"]],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def train(model_cfg: dict, log=print):
    """Tokenizer + model on the training split of the docstring corpus; returns (state, log)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..data.pydocs import corpus, join

    tc = model_cfg["train"]
    t0 = time.time()
    c = corpus(float(tc.get("valid_fraction", 0.1)))
    tok = train_tokenizer(c["train"], int(model_cfg["arch"]["vocab_size"]))
    WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
    tok.save(str(tokenizer_path(model_cfg["name"])))
    ids = torch.tensor(tok.encode(join(c["train"])).ids, dtype=torch.long)
    vids = torch.tensor(tok.encode(join(c["valid"])).ids, dtype=torch.long)
    log(f"tokenizer: {tok.get_vocab_size()} tokens, train {ids.numel()} / valid {vids.numel()} tokens ({time.time() - t0:.1f}s)")

    torch.manual_seed(int(tc["seed"]))
    model = LlamaForCausalLM(LlamaConfig(**embedded_config(model_cfg)))
    T, B, steps = int(tc["seqlen"]), int(tc["batch_size"]), int(tc["steps"])
    opt = torch.optim.AdamW(model.parameters(), lr=float(tc["lr"]), weight_decay=float(tc["weight_decay"]), betas=(0.9, 0.95))
    warm = max(1, int(0.05 * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    g = torch.Generator().manual_seed(int(tc["seed"]))
    model.train()
    losses = []
    for step in range(steps):
        starts = torch.randint(0, ids.numel() - T - 1, (B,), generator=g)
        x = torch.stack([ids[s:s + T] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            log(f"step {step} loss {sum(losses[-50:]) / len(losses[-50:]):.3f} ({time.time() - t0:.0f}s)")
    model.eval()
    with torch.no_grad():  # held-out perplexity, non-overlapping windows
        n = vids.numel() // T
        nll = sum(float(model(input_ids=vids[i * T:(i + 1) * T][None], labels=vids[i * T:(i + 1) * T][None]).loss) for i in range(n)) / n
    log(f"held-out ppl {math.exp(nll):.2f}")
    return model.state_dict(), {"final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4), "valid_ppl": round(math.exp(nll), 3),
                                "corpus_sha256": c["sha256"], "python": c["python"], "train_tokens": int(ids.numel()),
                                "valid_tokens": int(vids.numel())}
