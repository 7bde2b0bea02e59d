"""The shape of the core: the runner knows no task and no model library, methods know no family,
weight-only quantization has no activation quantizer, tasks are selected by name, and the lean
memory mode computes what the default mode computes."""
import copy
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, make_tiny_swin, make_tiny_vit
from qwt.models import adapter_for
from qwt.ptq import apply_ptq, get_specs
from qwt.quant import QuantMatMul, quantizers
from qwt.quant.modules import _QuantWeighted
from qwt.results import read_rows
from test_framework import run_py

LIBRARIES = ("timm", "transformers", "diffusers", "open_clip", "mmdet", "mmcv", "mmengine", "torchvision", "lm_eval")


def test_runner_imports_no_task_module_and_no_model_library():
    code = ("import sys, qwt.runner, qwt.compensation, qwt.ptq, qwt.quant, qwt.engine; "
            f"bad = [m for m in sys.modules if m.split('.')[0] in {LIBRARIES!r} or m.startswith('qwt.tasks.') and m != 'qwt.tasks.base' "
            "or m.startswith('qwt.models.') and m not in ('qwt.models.base',)]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
    src = (ROOT / "qwt" / "runner.py").read_text()
    assert not re.search(r"tasks\.(classification|detection|zeroshot|generation|language)", src)


def test_methods_contain_no_family_names_or_model_libraries():
    pattern = re.compile(r"family\s*==|\b(" + "|".join(LIBRARIES) + r")\b")
    hits = []
    for d in ("compensation", "ptq"):
        for p in (ROOT / "qwt" / d).glob("*.py"):
            for n, line in enumerate(p.read_text().splitlines(), 1):
                if pattern.search(line):
                    hits.append(f"{p.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not hits, "\n".join(hits)


@pytest.mark.parametrize("method", ["rtn", "percentile", "repq_vit", "hist_w8a8", "gptq"])
@pytest.mark.parametrize("make,shape", [(make_tiny_vit, (1, 8, 8)), (lambda: make_tiny_swin(img=16), (1, 16, 16))])
def test_w4a16_quantizes_no_activation(method, make, shape):
    fp = make()
    q = adapter_for(copy.deepcopy(fp))
    info = apply_ptq(q, get_specs(method, 4, 16), [torch.randn(4, *shape)], settings={})
    assert info["weight_only"]
    layers = [m for m in q.model.modules() if isinstance(m, _QuantWeighted)]
    assert layers and all(m.in_quant is None and m.w_quant is not None for m in layers)
    assert not any(isinstance(m, QuantMatMul) for m in q.model.modules())  # attention untouched
    assert all(qz in {m.w_quant for m in layers} for qz in quantizers(q.model))  # weight quantizers only


def test_unknown_task_is_a_config_error(tmp_path):
    r = run_py("task=segmentation", f"results.path={tmp_path}/r.jsonl", f"hydra.run.dir={tmp_path}/run", timeout=120)
    assert r.returncode == 2 and "task=" in r.stderr and "classification" in r.stderr and "Traceback" not in r.stderr


def test_lean_memory_mode_gives_the_same_rows_and_gptq_runs(tmp_path):
    common = ["ptq=rtn", "compensation.variants=[none,qwt,qwt_v2]", "data.val_subset=150",
              "compensation.qwt.num_samples=64", "compensation.qwt_v2.num_samples=64", "runtime.threads=1"]
    rows = {}
    for mode in ("copies", "lean"):
        r = run_py(*common, f"runtime.memory={mode}", f"results.path={tmp_path}/{mode}.jsonl", f"hydra.run.dir={tmp_path}/{mode}")
        assert r.returncode == 0, r.stderr[-3000:]
        rows[mode] = {x["compensation"]: x["metrics"] for x in read_rows(tmp_path / f"{mode}.jsonl")}
    assert rows["copies"] == rows["lean"]
    # a data-driven stage 1 (GPTQ through the layer-wise engine) on the embedded ViT writes rows
    r = run_py("ptq=gptq", "compensation=none", "data.val_subset=150", "runtime.threads=1", "runtime.memory=lean",
               f"results.path={tmp_path}/gptq.jsonl", f"hydra.run.dir={tmp_path}/gptq")
    assert r.returncode == 0, r.stderr[-3000:]
    (row,) = read_rows(tmp_path / "gptq.jsonl")
    assert row["ptq"] == "gptq" and row["ptq_info"]["gptq_layers"] > 0 and 0 <= row["metrics"]["top1"] <= 100
