"""ONNX QDQ export (qwt/deploy/onnx_export.py, tools/export_onnx.py) on a tiny random timm ViT:
ONNX Runtime reproduces our fake-quant model, the folded QwT-v2 graph is the base graph's shape,
quantizers without a QDQ form are refused."""
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from conftest import ROOT, make_tiny_vit  # noqa: E402

from qwt.compensation import CompContext, apply_variant, method_settings  # noqa: E402
from qwt.deploy import QDQExportError, export_onnx, graph_counts, ort_session  # noqa: E402
from qwt.deploy.onnx_export import ort_forward  # noqa: E402
from qwt.models import adapter_for  # noqa: E402
from qwt.ptq import apply_ptq, get_specs  # noqa: E402
from qwt.quant.modules import QuantMatMul, _QuantWeighted  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
X = torch.randn(48, 1, 8, 8, generator=torch.Generator().manual_seed(1))
X_TEST = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(2))


def calib(n, transform, batch_size, shard=False):
    n = min(n, len(X))
    return [X[s : min(s + batch_size, n)] for s in range(0, n, batch_size)]


def settings():
    st = method_settings()
    for k in ("qwt", "qwt_v2", "qft"):
        st[k].update(num_samples=32, batch_size=16)
    st["qft"].update(epochs=1, eval_loss=False)
    return st


def quantized(method="hist_w8a8"):
    fp = adapter_for(make_tiny_vit())
    q = fp.clone()
    apply_ptq(q, get_specs(method, 8, 8), calib(32, "train", 32))
    return fp, q


def variant(fp, q, name, st=None):
    a = q.clone()
    apply_variant(CompContext(a, fp, calib, None, "cpu", log=lambda *_: None), name, st or settings())
    return a


def ort_vs_model(model, path, mode):
    with torch.no_grad():
        ref = model(X_TEST)
    y = ort_forward(ort_session(path, mode))(X_TEST)
    return float((y - ref).abs().max()), float((y.argmax(-1) == ref.argmax(-1)).float().mean())


@pytest.mark.parametrize("method", ["hist_w8a8", "rtn"])
def test_export_runs_in_ort_with_parity(tmp_path, method):
    _, q = quantized(method)
    path = tmp_path / "base.onnx"
    counts = export_onnx(q.model, X_TEST[:2], path)
    mods = [m for m in q.model.modules() if isinstance(m, (_QuantWeighted, QuantMatMul))]
    n_act = sum(m.in_quant is not None for m in mods if isinstance(m, _QuantWeighted)) + 2 * sum(isinstance(m, QuantMatMul) for m in mods)
    n_w = sum(isinstance(m, _QuantWeighted) for m in mods)
    # one QuantizeLinear per quantized activation (both operands of each attention matmul), one
    # DequantizeLinear more per quantized weight (integer codes + DQ)
    assert counts["ops"]["QuantizeLinear"] == n_act
    assert counts["ops"]["DequantizeLinear"] == n_act + n_w
    import onnx

    proto = onnx.load(str(path))
    int_inits = [i for i in proto.graph.initializer if i.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) and len(i.dims) >= 2]
    assert len(int_inits) == n_w  # every quantized weight is stored as integer codes
    # graph as exported: float ops on dequantized values = our fake quantization (up to float
    # summation order flipping a rounding now and then); integer kernels: top-1 agreement
    diff, agree = ort_vs_model(q.model, path, "none")
    assert diff < 1e-2 and agree == 1.0
    diff_all, agree_all = ort_vs_model(q.model, path, "all")
    assert diff_all < 5e-2 and agree_all >= 0.9


def test_per_channel_weights_have_axis_and_symmetric_grid_is_exact_range(tmp_path):
    _, q = quantized("rtn")
    path = tmp_path / "rtn.onnx"
    export_onnx(q.model, X_TEST[:2], path)
    import onnx

    proto = onnx.load(str(path))
    dq_axis = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and any(a.name == "axis" for a in n.attribute)]
    assert len(dq_axis) == sum(isinstance(m, _QuantWeighted) for m in q.model.modules())  # per-channel weight scales
    assert "Clip" not in graph_counts(proto)["ops"]  # uint8 0..255 grids need no clip
    _, h = quantized("hist_w8a8")
    c = export_onnx(h.model, X_TEST[:2], tmp_path / "hist.onnx")
    assert c["ops"]["Clip"] == c["ops"]["QuantizeLinear"]  # -127..127 grids: Clip before each QuantizeLinear


def test_qwt_v2_fold_has_base_graph_counts_and_qwt_qft_export(tmp_path):
    fp, q = quantized("hist_w8a8")
    st = settings()
    st["qwt"]["branch_precision"] = "fp32"
    base = export_onnx(q.model, X_TEST[:2], tmp_path / "base.onnx")
    v2 = variant(fp, q, "qwt_v2", st)
    folded = export_onnx(v2.model, X_TEST[:2], tmp_path / "qwt_v2.onnx")
    assert (folded["nodes"], folded["initializers"]) == (base["nodes"], base["initializers"])
    assert folded["ops"] == base["ops"]
    assert ort_vs_model(v2.model, tmp_path / "qwt_v2.onnx", "none")[1] == 1.0
    qwt = variant(fp, q, "qwt", st)
    c = export_onnx(qwt.model, X_TEST[:2], tmp_path / "qwt.onnx")
    assert c["nodes"] > base["nodes"]  # the side branches: MatMul + Add per compensated block
    assert ort_vs_model(qwt.model, tmp_path / "qwt.onnx", "none")[1] == 1.0
    qft = variant(fp, q, "qft", st)
    export_onnx(qft.model, X_TEST[:2], tmp_path / "qft.onnx")
    assert ort_vs_model(qft.model, tmp_path / "qft.onnx", "none")[1] == 1.0


def test_refuses_log_sqrt2_quantizer(tmp_path):
    _, q = quantized("repq_vit")
    with pytest.raises(QDQExportError, match="log-sqrt2"):
        export_onnx(q.model, X_TEST[:2], tmp_path / "repq.onnx")
    assert not (tmp_path / "repq.onnx").exists()


def _tool():
    spec = importlib.util.spec_from_file_location("export_onnx_tool", Path(ROOT) / "tools" / "export_onnx.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_export_tool_writes_four_models_with_parity(tmp_path):
    tool = _tool()
    fp = adapter_for(make_tiny_vit())
    ptq_cfg = {"num_samples": 32, "calib_transform": "train", "batch_size": 32, "options": {}}
    st = settings()
    st["qwt"]["branch_precision"] = "fp32"
    adapters = tool.quantized_variants(fp, calib, st, "hist_w8a8", 8, 8, ptq_cfg, log=lambda *_: None)
    assert set(adapters) == {"none", "qwt", "qwt_v2", "qft"}
    labels = fp.model(X_TEST).argmax(-1)

    def evaluate(shim):
        preds = torch.cat([shim.model(X_TEST[i : i + 16]).argmax(-1) for i in range(0, len(X_TEST), 16)])
        return {"top1": 100.0 * float((preds == labels).float().mean())}, preds

    report = tool.export_and_check({v: a.model for v, a in adapters.items()}, X_TEST[:1], tmp_path, evaluate, log=lambda *_: None)
    for v in adapters:
        assert (tmp_path / f"{v}.onnx").exists()
        assert report[v]["ort_none"]["top1_agreement"] == 100.0
        assert report[v]["ort_none"]["n"] == len(X_TEST)
        assert report[v]["ort_all"]["top1_agreement"] >= 90.0
    assert tool.fold_check(report)["equal"]
    assert "| qwt_v2 |" in tool.markdown(report)


def test_bench_latency_tool_runs_on_a_tiny_model(tmp_path):
    import json

    spec = importlib.util.spec_from_file_location("bench_latency_tool", Path(ROOT) / "tools" / "bench_latency.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.MODELS["tiny"] = ("deit_tiny_patch16_224", "tiny", {"img_size": 32, "patch_size": 8, "depth": 2})
    bench.main(["--models", "tiny", "--batch", "2", "--reps", "3", "--warmup", "1", "--calib", "2", "--out", str(tmp_path)])
    doc = json.loads((tmp_path / "latency_cpu_b2.json").read_text())
    r = doc["models"]["tiny"]
    assert set(r["summary"]) == {"fp32", "base", "qwt", "qwt_v2"}
    assert r["summary"]["base"]["vs_base"] == 1.0 and all(len(v) == 3 for v in r["times_ms"].values())
    assert r["graph_counts"]["qwt_v2"] == r["graph_counts"]["base"]  # folded: the base graph's shape
    assert r["quantization"]["qwt_blocks"] == 2
