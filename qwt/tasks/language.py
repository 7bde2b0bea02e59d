"""Causal language modelling (LLaMA): GPTQ-style perplexity and lm-eval question answering.

Data (``data.name``):
  pydocs        the embedded default: the standard library's docstrings (``qwt/data/pydocs.py``);
                calibration = random ``seqlen`` windows of the training split's token stream
                (seed 0), perplexity on the held-out split (joined with "\\n\\n", non-overlapping
                windows), QA = ``pydoc_mc``, a 4-way multiple-choice task generated from held-out
                text (pick the true continuation among shuffled orders of its words), run through
                the real lm-eval harness offline.
  c4_wikitext2  the paper's protocol, from local files under ``data.root`` (or the datasets cache):
                calibration = 128 random ``seqlen`` windows of C4 train documents longer than
                seqlen (the GPTQ sampler, seed 0); perplexity on WikiText-2 test (joined with
                "\\n\\n", non-overlapping windows) and on 256 random windows of C4 validation
                (documents of >= seqlen tokens, Python ``random`` seeded 0, as GPTQ's ``get_c4``);
                QA = lm-eval's 8 commonsense tasks (their datasets must be in the HF cache).
Perplexity = exp(mean token NLL over all windows), the loss of each window's next-token
predictions (seqlen - 1 per window, weighted as GPTQ does: mean per window x seqlen).

QA runs ``lm_eval.simple_evaluate`` on the in-memory (quantized, compensated) model through
``HFLM(pretrained=model, tokenizer=tokenizer)``; every row stores each task's acc / acc_norm, the
metric the average uses (``data.qa.metric``) and the average.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import dist
from ..errors import ConfigError
from .base import Task

C4_TRAIN = "c4-train.00000-of-01024.json.gz"
C4_VALID = "c4-validation.00000-of-00008.json.gz"
WIKI_TEST = ("wikitext-2-raw/wiki.test.raw", "wiki.test.raw", "wikitext-2-raw-v1/wiki.test.raw")
LAYOUT = (f"<root>/{C4_TRAIN}, <root>/{C4_VALID} (allenai/c4 'en' shards, json lines with a 'text' field) and "
          f"<root>/wikitext-2-raw/wiki.test.raw (the WikiText-2 raw release); or the datasets cache "
          "(load_dataset('allenai/c4', data_files=...), load_dataset('wikitext', 'wikitext-2-raw-v1')) with HF_DATASETS_OFFLINE=1")


# ---------------------------------------------------------------------------------------------
# windows


def sample_windows(docs: list, n: int, seqlen: int, seed: int, tokenize, strict: bool = True) -> torch.Tensor:
    """GPTQ's C4 sampler: ``n`` windows of ``seqlen`` tokens, each from a random document with
    more (``strict``; train) or at least (validation) ``seqlen`` tokens, at a random offset;
    Python's ``random`` seeded with ``seed``. (n, seqlen) LongTensor."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        for _tries in range(100000):
            ids = tokenize(docs[rng.randint(0, len(docs) - 1)])
            if len(ids) > seqlen or (not strict and len(ids) >= seqlen):
                break
        else:
            raise ConfigError(f"no document has {seqlen} tokens: lower data.seqlen")
        i = rng.randint(0, len(ids) - seqlen - 1)
        out.append(torch.tensor(ids[i:i + seqlen], dtype=torch.long))
    return torch.stack(out)


def stream_windows(ids: torch.Tensor, n: int, seqlen: int, seed: int) -> torch.Tensor:
    """``n`` random windows of one token stream (fixed by ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen - 1, (n,), generator=g)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])


def consecutive_windows(ids: torch.Tensor, seqlen: int) -> torch.Tensor:
    """Non-overlapping windows of one token stream (WikiText-2 style); the tail is dropped."""
    n = ids.numel() // seqlen
    return ids[: n * seqlen].view(n, seqlen)


@torch.no_grad()
def perplexity(forward, windows: torch.Tensor, batch_size: int, device, desc: str = "ppl", keep_argmax: bool = False):
    """(ppl, argmax predictions or None): GPTQ's measure (mean NLL per window, averaged)."""
    idx = dist.shard(list(range(len(windows))))
    nll = torch.zeros(2, dtype=torch.float64)
    preds = []
    for s in tqdm(range(0, len(idx), batch_size), desc=desc, disable=not dist.is_main(), leave=False):
        x = windows[idx[s:s + batch_size]].to(device)
        logits = forward(x).float()
        lp = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none")
        nll[0] += float(lp.view(x.shape[0], -1).mean(1).double().sum())
        nll[1] += x.shape[0]
        if keep_argmax:
            preds.append(logits[:, :-1].argmax(-1).cpu())
    dist.all_reduce_sum(nll)
    return math.exp(float(nll[0] / nll[1])), (torch.cat(preds) if keep_argmax and preds else None)


# ---------------------------------------------------------------------------------------------
# the embedded multiple-choice task (lm-eval local task format)


def make_mc_items(docs: list[str], n_items: int, ctx_words: int, cont_words: int, seed: int = 0,
                  distractors: str = "shuffled") -> list[dict]:
    """4-way items from held-out documents: every document is cut into consecutive spans of
    ``ctx_words + cont_words`` words; an item's context is a span's first ``ctx_words`` words, the
    true continuation its next ``cont_words`` words. Distractors: "shuffled" = three distinct
    random orders of the continuation's own words (same words, same length: word order decides);
    "other" = ``cont_words``-word spans of other documents at random offsets (topic decides).
    ``n_items`` spans drawn at random; deterministic (``seed``)."""
    rng = random.Random(seed)
    words = [d.split() for d in docs]
    span = ctx_words + cont_words
    spans = [(i, s) for i, w in enumerate(words) for s in range(0, len(w) - span + 1, span)]
    pool = [i for i, w in enumerate(words) if len(w) >= cont_words]
    rng.shuffle(spans)
    items = []
    for i, start in spans[:n_items]:
        w = words[i]
        ctx = " ".join(w[start:start + ctx_words])
        true = " ".join(w[start + ctx_words:start + span])
        choices = [true]
        tries = 0
        while distractors == "shuffled" and len(choices) < 4 and tries < 100:
            tries += 1
            perm = w[start + ctx_words:start + span]
            perm = rng.sample(perm, len(perm))
            if " ".join(perm) not in choices:
                choices.append(" ".join(perm))
        if len(choices) < 4 and distractors == "shuffled":
            continue  # too few distinct words to shuffle
        while len(choices) < 4:
            j = rng.choice(pool)
            if j == i:
                continue
            o = rng.randint(0, len(words[j]) - cont_words)
            c = " ".join(words[j][o:o + cont_words])
            if c not in choices:
                choices.append(c)
        order = list(range(4))
        rng.shuffle(order)
        items.append({"context": ctx, "choices": [choices[k] for k in order], "label": order.index(0)})
    return items


MC_TASK = {
    "task": "pydoc_mc",
    "dataset_path": "json",
    "test_split": "test",
    "output_type": "multiple_choice",
    "doc_to_text": "context",
    "doc_to_choice": "choices",
    "doc_to_target": "label",
    "target_delimiter": " ",
    "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                    {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
    "metadata": {"version": 1.0},
}


def write_mc_task(folder: Path, items: list[dict]) -> Path:
    """The task YAML + its JSONL in ``folder`` (lm-eval's ``include_path``)."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "pydoc_mc.jsonl"
    tmp = data.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text("".join(json.dumps(it) + "\n" for it in items))
    os.replace(tmp, data)
    task = dict(MC_TASK, dataset_kwargs={"data_files": {"test": str(data.resolve())}})
    (folder / "pydoc_mc.yaml").write_text(yaml.safe_dump(task, sort_keys=False))
    return folder


# ---------------------------------------------------------------------------------------------
# real data from local files


def _read_jsonl_texts(path: str) -> list[str]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def load_c4(root, split: str) -> list[str]:
    name = C4_TRAIN if split == "train" else C4_VALID
    if root:
        for cand in (os.path.join(str(root), name), os.path.join(str(root), "en", name), os.path.join(str(root), name[:-3])):
            if os.path.isfile(cand):
                return _read_jsonl_texts(cand)
    try:
        import datasets

        return list(datasets.load_dataset("allenai/c4", data_files={split: f"en/{name}"}, split=split)["text"])
    except Exception as e:
        raise ConfigError(f"C4 {split} not found (data.root={root}): expected layout {LAYOUT} ({type(e).__name__})") from e


def load_wikitext2(root) -> str:
    if root:
        for rel in WIKI_TEST:
            p = os.path.join(str(root), rel)
            if os.path.isfile(p):
                with open(p, encoding="utf-8") as f:
                    # the HF dataset's rows are the raw file's lines (with their newline)
                    return "\n\n".join(line for line in f.read().splitlines(keepends=True))
    try:
        import datasets

        return "\n\n".join(datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"])
    except Exception as e:
        raise ConfigError(f"WikiText-2 test not found (data.root={root}): expected layout {LAYOUT} ({type(e).__name__})") from e


# ---------------------------------------------------------------------------------------------


class LanguageModelingTask(Task):
    name = "language"
    higher_is_better = False

    def __init__(self, cfg, device, log=print):
        super().__init__(cfg, device, log)
        from ..models.hf_llama import load_tokenizer

        d = cfg["data"]
        self.d = d
        self.seqlen = int(d["seqlen"])
        if self.seqlen < 2:
            raise ConfigError(f"data.seqlen={self.seqlen} must be >= 2")
        if d["name"] == "c4_wikitext2":  # the data first: a missing dataset fails before the model is looked up
            root = d.get("root")
            if root in (None, "", "???"):
                raise ConfigError(f"data.root is not set: point it at the folder with C4 and WikiText-2: {LAYOUT}")
            if not os.path.isdir(str(root)):
                raise ConfigError(f"data.root={root} is not a folder: {LAYOUT}")
        self.tok = load_tokenizer(cfg["model"])
        self.eval_bs = int(d.get("eval_batch_size") or cfg.get("runtime", {}).get("eval_batch_size", 8))
        qa = d.get("qa") or {}
        self.qa_tasks = list(qa.get("tasks") or [])
        self.qa_metric = dict(qa.get("metric") or {})
        self.eval_windows: dict[str, torch.Tensor] = {}
        kind = d["name"]
        if kind == "pydocs":
            self._build_pydocs(d)
        elif kind == "c4_wikitext2":
            self._build_real(d)
        else:
            raise ConfigError(f"data.name={kind!r} is unknown for task=language: use pydocs or c4_wikitext2")
        sets = list(self.eval_windows)
        self.headline = f"ppl_{sets[0]}"
        self.table_columns = tuple((f"ppl_{s}", f"ppl {s}", "{:.3f}") for s in sets) + \
            (("agree", "agree", "{:.2f}"),) + ((("qa_avg", "QA avg", "{:.2f}"),) if self.qa_tasks else ()) + \
            tuple((f"qa_{t}", t[:10], "{:.2f}") for t in self.qa_tasks)
        self._qa_manager = None
        if self.qa_tasks:
            self._check_qa()

    # -- data ------------------------------------------------------------------------------
    def _ids(self, text: str) -> list[int]:
        # the tokenizer's own special tokens, as GPTQ's data code (LLaMA: a BOS at the start of the
        # WikiText-2 stream and of every C4 document); the embedded tokenizer adds none
        return self.tok(text)["input_ids"]

    def _build_pydocs(self, d):
        from ..data.pydocs import corpus, join
        from ..models.shipped import weights_path

        c = corpus(float(d.get("valid_fraction", 0.1)))
        meta_p = weights_path(self.cfg["model"]["name"]).with_suffix(".json")
        if meta_p.is_file():
            trained = json.loads(meta_p.read_text()).get("training", {}).get("corpus_sha256")
            if trained and trained != c["sha256"]:
                self.log(f"[qwt] note: this Python ({c['python']}) ships other docstrings than the ones the embedded model was "
                         "trained on; the held-out split differs, so perplexities are not comparable across Pythons")
        self.corpus_sha256 = c["sha256"]
        self.train_ids = torch.tensor(self._ids(join(c["train"])), dtype=torch.long)
        self.eval_windows["valid"] = consecutive_windows(torch.tensor(self._ids(join(c["valid"])), dtype=torch.long), self.seqlen)
        if d.get("valid_windows"):
            self.eval_windows["valid"] = self.eval_windows["valid"][: int(d["valid_windows"])]
        if self.qa_tasks:
            if self.qa_tasks != ["pydoc_mc"]:
                raise ConfigError(f"data.qa.tasks={self.qa_tasks}: the embedded data has the local task pydoc_mc only")
            mc = d.get("mc") or {}
            items = make_mc_items(c["valid"], int(mc.get("items", 500)), int(mc.get("ctx_words", 16)), int(mc.get("cont_words", 8)),
                                  distractors=str(mc.get("distractors", "shuffled")))
            tag = hashlib.sha256(json.dumps([c["sha256"], mc], sort_keys=True).encode()).hexdigest()[:10]
            cache = Path(os.path.expanduser(str(d.get("cache_dir") or "~/.cache/qwt"))) / "lm_eval_tasks" / f"pydoc_mc-{tag}"
            self.qa_include = str(write_mc_task(cache, items))
            self.qa_defaults = False

    def _build_real(self, d):
        root = d.get("root")
        if root in (None, "", "???"):
            raise ConfigError(f"data.root is not set: point it at the folder with C4 and WikiText-2: {LAYOUT}")
        if not os.path.isdir(str(root)):
            raise ConfigError(f"data.root={root} is not a folder: {LAYOUT}")
        self.c4_train = load_c4(root, "train")
        sets = list(d.get("eval_sets") or ["wikitext2", "c4"])
        for s in sets:
            if s == "wikitext2":
                ids = torch.tensor(self._ids(load_wikitext2(root)), dtype=torch.long)
                self.eval_windows[s] = consecutive_windows(ids, self.seqlen)
            elif s == "c4":
                self.eval_windows[s] = sample_windows(load_c4(root, "validation"), int(d.get("c4_eval_windows", 256)),
                                                      self.seqlen, 0, self._ids, strict=False)
            else:
                raise ConfigError(f"data.eval_sets entry {s!r}: use wikitext2 and/or c4")
        self.qa_include = d.get("qa", {}).get("include_path")
        self.qa_defaults = True

    def _check_qa(self):
        """Fail early: every QA task and its dataset must load offline, before any computation."""
        try:
            from lm_eval.tasks import TaskManager
        except ImportError as e:
            raise ConfigError("data.qa.tasks needs lm-eval (pip install lm-eval); or set data.qa.tasks=[]") from e
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        self._qa_manager = TaskManager(include_path=self.qa_include, include_defaults=self.qa_defaults)
        try:
            self._qa_loaded = self._qa_manager.load(self.qa_tasks)
            names = set(self._qa_loaded["tasks"]) if isinstance(self._qa_loaded, dict) and "tasks" in self._qa_loaded else None
        except Exception as e:
            raise ConfigError(f"data.qa.tasks={self.qa_tasks}: lm-eval could not load them offline ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''}). Put their datasets in the Hugging Face cache "
                              "(run lm-eval once with network), or set data.qa.tasks=[] to measure perplexity only") from e
        if names is not None and not set(self.qa_tasks) <= names:
            raise ConfigError(f"data.qa.tasks: lm-eval does not know {sorted(set(self.qa_tasks) - names)}")

    def calibration(self, n, transform, batch_size, shard=False):
        if self.d["name"] == "pydocs":
            w = stream_windows(self.train_ids, n, self.seqlen, self.seed)
        else:
            w = sample_windows(self.c4_train, n, self.seqlen, self.seed, self._ids, strict=True)
        idx = dist.shard(list(range(n))) if shard else list(range(n))
        w = w[idx]
        return [w[s:s + batch_size].to(self.device) for s in range(0, len(w), batch_size)]

    def train_batches(self, batch_size):
        return None

    # -- evaluation ------------------------------------------------------------------------
    def evaluate(self, adapter, reference=None, desc="eval"):
        metrics, outputs = {}, {}
        for name, windows in self.eval_windows.items():
            ppl, pred = perplexity(adapter.forward, windows, self.eval_bs, self.device, desc=f"{desc} {name}", keep_argmax=True)
            metrics[f"ppl_{name}"] = ppl
            outputs[name] = pred
        first = next(iter(self.eval_windows))
        if reference is not None and outputs[first] is not None and reference.get(first) is not None:
            metrics["agree"] = 100.0 * float((outputs[first] == reference[first]).float().mean())
        if self.qa_tasks:
            metrics.update(self.qa(adapter.model))
        return metrics, outputs

    def qa(self, model) -> dict:
        import numpy as np
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        qa = self.d.get("qa") or {}
        state = (random.getstate(), np.random.get_state())
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            lm = HFLM(pretrained=model, tokenizer=self.tok, batch_size=int(qa.get("batch_size", 16)),
                      max_length=int(qa.get("max_length") or getattr(model.config, "max_position_embeddings", 2048)))
            res = simple_evaluate(model=lm, tasks=self.qa_tasks, task_manager=self._qa_manager,
                                  num_fewshot=qa.get("num_fewshot"), limit=qa.get("limit"), log_samples=False,
                                  bootstrap_iters=0, verbosity="ERROR")
        random.setstate(state[0])
        np.random.set_state(state[1])
        out, accs = {}, []
        for t in self.qa_tasks:
            r = res["results"][t]
            for m in ("acc", "acc_norm"):
                v = r.get(f"{m},none")
                if v is not None:
                    out[f"qa_{t}_{m}"] = 100.0 * float(v)
            key = self.qa_metric.get(t, "acc")
            out[f"qa_{t}"] = out.get(f"qa_{t}_{key}", out.get(f"qa_{t}_acc"))
            accs.append(out[f"qa_{t}"])
        out["qa_avg"] = sum(accs) / len(accs)
        return out

    # -- reporting -------------------------------------------------------------------------
    def format_table(self, rows, fp_metrics):
        return super().format_table(rows, fp_metrics)
