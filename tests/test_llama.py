"""The LLaMA family: the shipped embedded LLaMA through its adapter, both QwT targets' equations
(closed form), GPTQ against RTN on a decoder layer's calibration inputs, the language task's data
paths (embedded and real files), the lm-eval local task, and one end-to-end run through run.py."""
import copy
import gzip
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import ROOT

transformers = pytest.importorskip("transformers")

from qwt.compensation import CompContext, apply_variant, method_settings, parse_steps, parse_variant, step_settings  # noqa: E402
from qwt.compensation.qwt import QwTBlock  # noqa: E402
from qwt.engine import run_chain  # noqa: E402
from qwt.errors import ConfigError  # noqa: E402
from qwt.models import adapter_for  # noqa: E402
from qwt.ptq import apply_ptq, get_specs  # noqa: E402
from qwt.quant.modules import float_view  # noqa: E402

MODEL_CFG = yaml.safe_load((ROOT / "configs" / "model" / "llama_embedded.yaml").read_text())


@pytest.fixture(scope="module")
def embedded():
    from qwt.models.hf_llama import build_llama, load_tokenizer

    return build_llama(MODEL_CFG), load_tokenizer(MODEL_CFG)


def windows(tok, n=4, t=32, seed=0):
    from qwt.data.pydocs import corpus, join
    from qwt.tasks.language import stream_windows

    ids = torch.tensor(tok(join(corpus()["valid"][:200]), add_special_tokens=False)["input_ids"])
    return stream_windows(ids, n, t, seed)


def tiny_llama(layers=2, hidden=32, seed=0, vocab=64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)).eval()
    with torch.no_grad():
        for mod in m.modules():
            if type(mod).__name__ == "LlamaRMSNorm":
                mod.weight.uniform_(0.5, 1.5)
    return m


# ---------------------------------------------------------------------------------------------
# the model


def test_embedded_llama_adapter_reproduces_the_logits_exactly(embedded):
    model, tok = embedded
    x = windows(tok, n=2, t=24)
    a = adapter_for(model)
    with torch.no_grad():
        ref = model(input_ids=x).logits
        torch.testing.assert_close(a.forward(x), ref, rtol=0, atol=0)
        s, hs = run_chain(a, x, keep_units=True)
        assert len(hs) == MODEL_CFG["arch"]["num_hidden_layers"]
        torch.testing.assert_close(a.head(s), ref, rtol=0, atol=0)


def test_shipped_tokenizer_round_trips_text(embedded):
    _, tok = embedded
    text = "Return the number of items in the container.\n\n    >>> len([1, 2])"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


# ---------------------------------------------------------------------------------------------
# QwT's two targets, in closed form


def _settings(**qwt):
    s = method_settings()
    s["qwt"].update(num_samples=8, batch_size=8, **qwt)  # one batch: the recorded X is every row
    return s


def _ctx(adapter, fp_adapter, batches):
    return CompContext(adapter, fp_adapter, lambda n, t, bs, shard=False: batches, device="cpu", log=lambda *a: None)


@pytest.fixture(scope="module")
def rtn_case():
    fp = tiny_llama()
    q = adapter_for(copy.deepcopy(fp))
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 64, (8, 12), generator=g)]
    apply_ptq(q, get_specs("rtn", 3, 16), batches)
    return fp, q, batches


def _fp_chain_outputs(fp, batch):
    a = adapter_for(fp)
    s = a.stem(batch)
    outs = []
    with torch.no_grad():
        for u in a.units():
            s = a.run_unit(u, s)
            outs.append(s.h)
    return outs


@pytest.mark.parametrize("solver", ["lstsq", "nointercept"])
def test_global_target_is_the_reference_equation(rtn_case, solver):
    """Layer k's branch: W = lstsq(X, Y_FPchain_k - block_Q(X)) with X the quantized chain's input
    (upstream branches included), no intercept column; b = mean residual."""
    fp, q, batches = rtn_case
    comp, record = q.clone(), {}
    info = apply_variant(_ctx(comp, adapter_for(fp), batches), "qwt",
                         _settings(target="global", solver=solver, ridge=0.0, branch_precision="fp32", _record=record))["qwt"]
    assert info["target"] == "global" and info["solver"] == solver
    y_fp = _fp_chain_outputs(fp, batches[0])
    for k, u in enumerate(comp.units()):
        blk = comp.get(u.name)
        if not isinstance(blk, QwTBlock):
            continue
        X = record[k]
        kw = comp.stem(batches[0]).kwargs
        with torch.no_grad():
            y_q = blk.block(X, **kw)
            y_q = y_q[0] if isinstance(y_q, tuple) else y_q
        Xf, R = X.reshape(-1, X.shape[-1]).double(), (y_fp[k] - y_q).reshape(-1, X.shape[-1]).double()
        W = torch.linalg.lstsq(Xf, R).solution
        b = (R - Xf @ W).mean(0)
        torch.testing.assert_close(blk.branch.weight.double(), W.T, rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(blk.branch.bias.double(), b, rtol=1e-3, atol=1e-5)
    # the quantized chain of layer 1 starts after layer 0's branch: its X is not the FP chain's
    assert not torch.allclose(record[1], y_fp[0])


def test_local_target_is_the_vision_equation(rtn_case):
    """Layer k's branch: [W; b] = lstsq([X 1], block_FP(X) - block_Q(X)), both on the quantized chain's X."""
    fp, q, batches = rtn_case
    comp, record = q.clone(), {}
    apply_variant(_ctx(comp, adapter_for(fp), batches), "qwt",
                  _settings(target="local", solver="cholesky", ridge=0.0, branch_precision="fp32", _record=record))
    kw = comp.stem(batches[0]).kwargs
    n = 0
    for k, u in enumerate(comp.units()):
        blk = comp.get(u.name)
        if not isinstance(blk, QwTBlock):
            continue
        X = record[k]
        with torch.no_grad():
            y_q = blk.block(X, **kw)
            with float_view(comp.model):
                y_f = blk.block(X, **kw)
        y_q, y_f = (y[0] if isinstance(y, tuple) else y for y in (y_q, y_f))
        Xf = X.reshape(-1, X.shape[-1]).double()
        A = torch.cat([Xf, torch.ones_like(Xf[:, :1])], 1)
        theta = torch.linalg.lstsq(A, (y_f - y_q).reshape(-1, X.shape[-1]).double()).solution
        torch.testing.assert_close(blk.branch.weight.double(), theta[:-1].T, rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(blk.branch.bias.double(), theta[-1], rtol=1e-3, atol=1e-4)
        n += 1
    assert n >= 1


def test_variant_profiles():
    assert parse_steps("qwt@local+qwt_v2") == [("qwt", "local"), ("qwt_v2", None)]
    assert parse_variant("qwt@local") == ["qwt"]
    s = {"qwt": {"target": "global", "profiles": {"local": {"target": "local"}}}}
    assert step_settings(s, "qwt", "local") == {"target": "local"}
    assert step_settings(s, "qwt", None) == {"target": "global"}
    with pytest.raises(ConfigError, match="profiles"):
        step_settings(s, "qwt", "nope")
    with pytest.raises(ConfigError):
        parse_steps("qwtx@local")


# ---------------------------------------------------------------------------------------------
# GPTQ vs RTN on a decoder layer's calibration inputs


def test_gptq_layer_loss_not_worse_than_rtn(embedded):
    model, tok = embedded
    calib = [windows(tok, n=8, t=64, seed=3)]
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.0.self_attn.k_proj"]
    a = adapter_for(model)
    xs = {}
    hooks = [a.get(n).register_forward_hook(lambda m, i, o, n=n: xs.__setitem__(n, i[0].reshape(-1, i[0].shape[-1]).double()))
             for n in names]
    with torch.no_grad():
        model(input_ids=calib[0])
    for h in hooks:
        h.remove()
    errs = {}
    for method in ("rtn", "gptq"):
        q = adapter_for(copy.deepcopy(model))
        apply_ptq(q, get_specs(method, 3, 16, keep_8bit=False), calib)
        for n in names:
            m = q.get(n)
            with torch.no_grad():
                wq = m.w_quant(m.weight).double() if m.w_quant is not None else m.weight.double()
            W = a.get(n).weight.double()
            errs[method, n] = float(((xs[n] @ (W - wq).T) ** 2).sum())
    for n in names:
        assert errs["gptq", n] <= errs["rtn", n], (n, errs)


# ---------------------------------------------------------------------------------------------
# data and evaluation


def test_gptq_c4_sampler_and_windows():
    from qwt.tasks.language import consecutive_windows, sample_windows

    docs = ["a " * 3, "b " * 40, "c " * 10]
    tokenize = lambda s: [ord(ch) for ch in s]  # noqa: E731
    w = sample_windows(docs, 5, 20, seed=0, tokenize=tokenize)
    assert w.shape == (5, 20) and set(w.unique().tolist()) <= {ord("b"), ord(" ")}
    torch.testing.assert_close(w, sample_windows(docs, 5, 20, seed=0, tokenize=tokenize))
    assert consecutive_windows(torch.arange(10), 3).tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


def test_mc_items_are_well_formed():
    from qwt.data.pydocs import corpus
    from qwt.tasks.language import make_mc_items

    docs = corpus()["valid"]
    items = make_mc_items(docs, 50, 16, 8)
    assert items == make_mc_items(docs, 50, 16, 8) and len(items) == 50
    for it in items:
        assert len(it["choices"]) == 4 == len(set(it["choices"])) and 0 <= it["label"] < 4
        assert sorted(it["choices"][0].split()) == sorted(it["choices"][1].split())  # shuffled distractors
        # the gold choice continues the context in some held-out document
        assert any(it["context"] + " " + it["choices"][it["label"]] in " ".join(d.split()) for d in docs)


def test_lm_eval_local_task_runs(embedded, tmp_path):
    """The generated task YAML + JSONL load through lm-eval's TaskManager and simple_evaluate runs
    offline on the in-memory model (HFLM wrapping the model object and its tokenizer)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from qwt.data.pydocs import corpus
    from qwt.tasks.language import make_mc_items, write_mc_task

    model, tok = embedded
    folder = write_mc_task(tmp_path / "tasks", make_mc_items(corpus()["valid"], 12, 16, 8))
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    res = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=16, max_length=256), tasks=["pydoc_mc"],
                          task_manager=TaskManager(include_path=str(folder), include_defaults=False), num_fewshot=0,
                          log_samples=False, bootstrap_iters=0)
    r = res["results"]["pydoc_mc"]
    assert 0.0 <= r["acc,none"] <= 1.0 and 0.0 <= r["acc_norm,none"] <= 1.0


def test_real_data_path_from_local_files(tmp_path, embedded):
    """task=language with data=c4_wikitext2 from files (a tiny LlamaForCausalLM folder + C4 shards +
    WikiText-2 raw): GPTQ's windows and finite perplexities; missing data / weights fail early."""
    from qwt.models.hf_llama import build_llama
    from qwt.tasks.language import C4_TRAIN, C4_VALID, LanguageModelingTask

    _, tok = embedded
    mdir = tmp_path / "model"
    tiny_llama(vocab=MODEL_CFG["arch"]["vocab_size"]).save_pretrained(mdir)
    tok.save_pretrained(mdir)
    data = tmp_path / "data"
    (data / "wikitext-2-raw").mkdir(parents=True)
    text = " ".join(f"The function number {i} returns a value." for i in range(100))
    for name in (C4_TRAIN, C4_VALID):
        with gzip.open(data / name, "wt") as f:
            for i in range(30):
                f.write(json.dumps({"text": text[i * 50:] if i % 3 else "short"}) + "\n")
    (data / "wikitext-2-raw" / "wiki.test.raw").write_text(" = Title = \n" + text + "\n")
    model_cfg = {"name": "tiny", "source": "hf_llama", "path": str(mdir), "dtype": "float32"}
    d = yaml.safe_load((ROOT / "configs" / "data" / "c4_wikitext2.yaml").read_text())
    d.update(root=str(data), seqlen=32, c4_eval_windows=4, qa={"tasks": []})
    cfg = {"model": model_cfg, "data": d, "seed": 0, "runtime": {}}
    task = LanguageModelingTask(cfg, torch.device("cpu"), log=lambda *a: None)
    assert set(task.eval_windows) == {"wikitext2", "c4"} and task.eval_windows["c4"].shape == (4, 32)
    calib = task.calibration(6, "train", 4)
    assert [b.shape for b in calib] == [(4, 32), (2, 32)]
    model = build_llama(model_cfg)
    metrics, _ = task.evaluate(adapter_for(model))
    assert all(math.isfinite(metrics[k]) and metrics[k] > 1 for k in ("ppl_wikitext2", "ppl_c4"))
    with pytest.raises(ConfigError, match="data.root"):
        LanguageModelingTask(dict(cfg, data=dict(d, root=str(tmp_path / "none"))), torch.device("cpu"))
    with pytest.raises(ConfigError, match="model.path"):
        build_llama({"name": "x", "path": str(tmp_path / "nothing")})


# ---------------------------------------------------------------------------------------------
# end to end


def test_embedded_llama_end_to_end_through_run_py(tmp_path):
    out = tmp_path / "runs.jsonl"
    cmd = [sys.executable, "run.py", "+exp=llama_embedded", "hydra.mode=RUN", "ptq=gptq", "data.valid_windows=6", "data.mc.items=16",
           "ptq.num_samples=8", "ptq.batch_size=8", "compensation.variants=[none,qwt,qwt@local,qwt_v2]",
           "compensation.qwt.num_samples=8", "compensation.qwt_v2.num_samples=8", f"results.path={out}",
           f"hydra.run.dir={tmp_path}/hydra", f"data.cache_dir={tmp_path}/cache"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", QWT_CACHE=str(tmp_path / "cache"))
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["compensation"] for row in rows] == ["none", "qwt", "qwt@local", "qwt_v2"]
    for row in rows:
        m = row["metrics"]
        assert row["task"] == "language" and row["ptq"] == "gptq" and (row["w_bits"], row["a_bits"]) == (4, 16)
        assert math.isfinite(m["ppl_valid"]) and 0 <= m["qa_pydoc_mc"] <= 100 and "qa_pydoc_mc_acc_norm" in m
        assert "qa_avg" in row["fp_metrics"]
    info = {row["compensation"]: row["compensation_info"] for row in rows}
    assert info["qwt"]["qwt"]["target"] == "global" and info["qwt@local"]["qwt@local"]["target"] == "local"


@pytest.mark.parametrize("exp", ["llama_embedded", "llama3_8b_w4", "llama2_7b_w4"])
def test_llama_exps_compose(exp):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        c = OmegaConf.to_container(compose(config_name="config", overrides=[f"+exp={exp}"]), resolve=True)
    assert c["task"] == "language" and c["model"]["source"] == "hf_llama" and (c["bits"]["w"], c["bits"]["a"]) == (4, 16)
    assert c["ptq"]["name"] == "gptq" and c["compensation"]["qwt"]["target"] == "global"
    assert c["runtime"]["memory"] == "lean" and c["runtime"]["offload"] == "cpu"
    assert step_settings(c["compensation"], "qwt", "local")["target"] == "local"
    if exp != "llama_embedded":
        assert c["data"]["seqlen"] == 2048 and c["ptq"]["num_samples"] == 128 and len(c["data"]["qa"]["tasks"]) == 8


@pytest.mark.slow
def test_missing_qa_datasets_fail_early(monkeypatch):
    """The 8 commonsense tasks without their datasets in the HF cache: a ConfigError at task build."""
    from qwt.tasks.language import LanguageModelingTask

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = LanguageModelingTask.__new__(LanguageModelingTask)
    t.qa_include, t.qa_defaults, t.qa_tasks = None, True, ["piqa"]
    with pytest.raises(ConfigError, match="data.qa.tasks"):
        t._check_qa()


def test_unknown_profile_and_duplicate_steps_fail_validation():
    from qwt.validate import check_config

    base = {"compensation": {"variants": ["none", "qwt@nope"], "qwt": {"profiles": {"local": {"target": "local"}}}},
            "bits": {"w": 4, "a": 16}}
    with pytest.raises(ConfigError, match="profiles has no 'nope'"):
        check_config(base)
    base["compensation"]["variants"] = ["qwt@local", "qwt@local"]
    with pytest.raises(ConfigError, match="twice"):
        check_config(base)
