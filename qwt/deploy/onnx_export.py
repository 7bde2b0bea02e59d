"""Export a uniformly fake-quantized model as an ONNX graph in QDQ form, and run it in ONNX Runtime.

QDQ form (what ONNX Runtime's and TensorRT's integer paths consume):
  * every quantized activation (a quantized layer's input, both operands of each attention matmul)
    is ``QuantizeLinear -> DequantizeLinear`` with the calibrated scale and zero-point
    (int8 for symmetric grids, uint8 for asymmetric ones; ``axis`` where the quantizer is per channel);
  * every quantized weight is stored as its integer codes (an int8 / uint8 initializer) followed by
    ``DequantizeLinear`` (per-channel scales with ``axis`` where the model has them);
  * the op itself (MatMul + bias Add, Conv) in float on the dequantized operands: an engine fuses
    ``DQ -> op`` into an integer kernel.
Everything else (LayerNorm, softmax, GELU, residual adds, a QwT branch in float32 or float16 as the
model computes it, an unfolded QwT-v2 affine) is exported as the model computes it.

Exactness. The graph computes what our fake-quant model computes: QuantizeLinear is
``saturate(round_half_even(x / scale) + zero)``, as ``fake_quant_uniform``; dequantized weights are
``(codes - zero) * scale`` in float32, bit for bit the model's. Grids narrower than the storage type
(symmetric grids are narrow range, -127..127, as TensorRT's; activation bit-widths below 8) get a
``Clip`` to the grid's range before ``QuantizeLinear`` (``exact_range=True``), without which
QuantizeLinear would saturate at -128 instead of -127. Differences that remain are float summation
order in MatMul / Conv / LayerNorm (ULPs), which now and then move a value across a rounding
boundary of the next quantizer; ONNX Runtime's fused integer kernels may round the requantization
differently again (measured by ``tools/export_onnx.py``).

Refused (``QDQExportError``): quantizers with no QDQ form -- the log-sqrt2 softmax quantizer
(RepQ-ViT), dynamic (per-token / per-group, computed per input) quantizers, per-group weight scales,
grids wider than 8 bits.

Implementation: for the duration of the export, each quantizer's and quantized layer's ``forward``
is shadowed by an ``autograd.Function`` whose eager forward is the model's own fake-quant
computation and whose ONNX symbolic emits the QDQ nodes (TorchScript exporter, ``dynamo=False``).
Constants are then moved to initializers, so that node and initializer counts describe the graph.
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..quant.modules import QuantLinear, QuantModule, Quantizer, _QuantWeighted
from ..quant.quantizer import fake_quant, quantize_codes

OPSET = 17
# ONNX Runtime fuses MatMul + Add into Gemm (reshaping 3-D inputs to 2-D), which takes the MatMul out
# of the DQ -> MatMul pattern that its integer kernels are selected by.
DISABLED_OPTIMIZERS = ("MatMulAddFusion",)


class QDQExportError(ConfigError):
    """The model has a quantizer (or layer) that has no QDQ form."""


# ---------------------------------------------------------------------------------------------
# quantization parameters in ONNX form


class _Act:
    """An activation quantizer's QDQ parameters (a plain object: passed to the symbolic as is)."""

    def __init__(self, q: Quantizer, x: torch.Tensor, name: str, exact_range: bool):
        spec = q.spec
        check_spec(spec, name)
        self.q = q
        scale, zero = q.scale.detach().float(), q.zero.detach().float()
        self.dtype = _storage(spec, name)
        lo, hi = _RANGE[self.dtype]
        if not torch.equal(zero, zero.round()) or float(zero.min()) < lo or float(zero.max()) > hi:
            raise QDQExportError(f"{name}: zero-point outside the {self.dtype} range or not an integer (numerics=reference "
                                 "with uniform_range=reference leaves it unclamped); export needs numerics=default")
        if spec.granularity == "channel":
            self.axis = spec.axis % x.dim()
            self.scale, self.zero = scale.reshape(-1), zero.reshape(-1).to(self.dtype)
        else:
            self.axis = None
            self.scale, self.zero = scale.reshape(()), zero.reshape(()).to(self.dtype)
        self.clip = None
        if exact_range and (spec.qmin > lo or spec.qmax < hi):
            c_lo, c_hi = (spec.qmin - zero) * scale, (spec.qmax - zero) * scale
            self.clip = (c_lo.reshape(()), c_hi.reshape(())) if self.axis is None else (c_lo, c_hi)


class _Weight:
    """A quantized layer's weight codes, scale, zero-point and bias in ONNX form."""

    def __init__(self, layer: _QuantWeighted, name: str):
        q = layer.w_quant
        spec = q.spec
        check_spec(spec, name + ".weight")
        if layer.w_gidx is not None:
            raise QDQExportError(f"{name}: weights with per-column group indices (GPTQ act-order groups) have no QDQ form")
        w = layer.weight.detach()
        scale, zero = q.scale.detach().float(), q.zero.detach().float()
        codes = layer.w_codes if layer.w_codes is not None else quantize_codes(w.float(), scale, zero, spec.qmin, spec.qmax)
        codes = codes.float()
        self.dtype = torch.int8 if float(codes.min()) < 0 or float(zero.min()) < 0 else torch.uint8
        lo, hi = _RANGE[self.dtype]
        if float(codes.min()) < lo or float(codes.max()) > hi or float(zero.min()) < lo or float(zero.max()) > hi:
            raise QDQExportError(f"{name}: weight codes / zero-point do not fit {self.dtype}")
        per_channel = spec.granularity == "channel"
        if per_channel and spec.axis % w.dim() != 0:
            raise QDQExportError(f"{name}: per-channel weight scales along axis {spec.axis} (only output channels have a QDQ form here)")
        self.codes = codes.to(self.dtype)
        self.scale = scale.reshape(-1) if per_channel else scale.reshape(())
        zero = zero.reshape(-1) if per_channel else zero.reshape(())
        self.zero = None if bool((zero == 0).all()) else zero.to(self.dtype)  # omitted: 0 of the codes' type
        self.per_channel = per_channel
        self.bias = None if layer.bias is None else layer.bias.detach().float().clone()
        self.layer = layer


_RANGE = {torch.int8: (-128, 127), torch.uint8: (0, 255)}


def _storage(spec, name) -> torch.dtype:
    if spec.symmetric:
        return torch.int8
    if spec.qmin >= 0 and spec.qmax <= 255:
        return torch.uint8
    raise QDQExportError(f"{name}: grid {spec.qmin}..{spec.qmax} fits neither int8 nor uint8")


def check_spec(spec, name: str) -> None:
    """Raise ``QDQExportError`` for a quantizer with no QDQ form."""
    if spec.scheme == "log_sqrt2":
        raise QDQExportError(
            f"{name}: the log-sqrt2 quantizer (RepQ-ViT's post-softmax quantizer) has no QDQ form: QuantizeLinear / "
            "DequantizeLinear are uniform affine. Export a uniformly quantized model (ptq=hist_w8a8, rtn or percentile) instead."
        )
    if spec.dynamic:
        raise QDQExportError(f"{name}: a dynamic quantizer (scale computed from each input) has no static QDQ form")
    if spec.granularity not in ("tensor", "channel"):
        raise QDQExportError(f"{name}: {spec.granularity}-wise scales have no QDQ form (per-tensor or per-channel only)")
    if spec.bits > 8:
        raise QDQExportError(f"{name}: {spec.bits}-bit grids do not fit int8 / uint8")


# ---------------------------------------------------------------------------------------------
# autograd Functions: eager forward = our fake quantization, ONNX symbolic = QDQ nodes


def _axis(axis):
    return {} if axis is None else {"axis_i": int(axis)}


# The tracer records tensor inputs of a Function (as constants here) but neither arbitrary Python
# objects nor tensors captured from outside: configuration travels in a closure (a Function class per
# quantizer), tensors as inputs (fresh copies, so that they become constants, not parameters).


def _fresh(t: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(t.detach().cpu().contiguous().numpy().copy())


def _bshape(t: torch.Tensor, axis, ndim: int) -> torch.Tensor:
    """A 1-D per-axis tensor viewed so that it broadcasts along ``axis`` of an ``ndim`` tensor."""
    if axis is None:
        return t
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


def _qdq(p: _Act, x: torch.Tensor) -> torch.Tensor:
    axis, ndim, qmin, qmax, clip = p.axis, x.dim(), p.q.spec.qmin, p.q.spec.qmax, p.clip is not None

    class QDQ(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, s, z, *lohi):  # the model's fake quantization (fake_quant_uniform)
            s, z = _bshape(s, axis, ndim), _bshape(z.float(), axis, ndim)
            q = torch.clamp(torch.round(x / s) + z, qmin, qmax)
            return (q - z) * s

        @staticmethod
        def symbolic(g, x, s, z, *lohi):
            if clip:
                lo, hi = lohi
                x = g.op("Clip", x, lo, hi) if axis is None else g.op("Max", g.op("Min", x, hi), lo)
            return g.op("DequantizeLinear", g.op("QuantizeLinear", x, s, z, **_axis(axis)), s, z, **_axis(axis))

    lohi = () if not clip else tuple(_fresh(_bshape(c.reshape(-1), axis, ndim) if axis is not None else c) for c in p.clip)
    return QDQ.apply(x, _fresh(p.scale), _fresh(p.zero), *lohi)


def _weighted(p: _Weight, x: torch.Tensor) -> torch.Tensor:
    m = p.layer
    linear = isinstance(m, QuantLinear)
    axis = (1 if linear else 0) if p.per_channel else None
    has_zero, has_bias = p.zero is not None, p.bias is not None
    w_ndim = m.weight.dim()

    class QW(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, codes, s, *rest):  # (codes - zero) * scale: the model's quantized weight
            rest = list(rest)
            z = rest.pop(0).float() if has_zero else 0.0
            b = rest.pop(0) if has_bias else None
            c = codes.t() if linear else codes
            w_axis = None if axis is None else 0
            w = (c.float() - (_bshape(z, w_axis, w_ndim) if has_zero else 0.0)) * _bshape(s, w_axis, w_ndim)
            return m._op(x, w, b)

        @staticmethod
        def symbolic(g, x, codes, s, *rest):
            rest = list(rest)
            z = [rest.pop(0)] if has_zero else []
            b = rest.pop(0) if has_bias else None
            w = g.op("DequantizeLinear", codes, s, *z, **_axis(axis))
            if linear:  # x @ w (w stored as (in, out)) + b
                y = g.op("MatMul", x, w)
                return y if b is None else g.op("Add", y, b)
            pad = list(m.padding)
            return g.op("Conv", x, w, *([] if b is None else [b]), kernel_shape_i=list(m.kernel_size), strides_i=list(m.stride),
                        pads_i=pad + pad, dilations_i=list(m.dilation), group_i=int(m.groups))

    codes = p.codes.t().contiguous() if linear else p.codes
    args = [_fresh(codes), _fresh(p.scale)] + ([_fresh(p.zero)] if has_zero else []) + ([_fresh(p.bias)] if has_bias else [])
    return QW.apply(x, *args)


# ---------------------------------------------------------------------------------------------
# export form: shadow forwards while exporting


def check_exportable(model: nn.Module) -> int:
    """Raise ``QDQExportError`` if an active quantizer has no QDQ form; returns the number of
    quantized modules."""
    n = 0
    for name, m in model.named_modules():
        if not isinstance(m, QuantModule) or not m.quantized:
            continue
        n += 1
        if isinstance(m, _QuantWeighted):
            if m.w_on and m.w_quant is not None:
                check_spec(m.w_quant.spec, f"{name}.w_quant")
            if m.a_on and m.in_quant is not None:
                check_spec(m.in_quant.spec, f"{name}.in_quant")
        elif m.a_on:
            for qn in ("a_quant", "b_quant"):
                q = getattr(m, qn, None)
                if q is not None:
                    check_spec(q.spec, f"{name}.{qn}")
    return n


@contextlib.contextmanager
def export_form(model: nn.Module, exact_range: bool = True):
    """Within the context, ``model``'s quantizers and quantized layers trace to QDQ nodes."""
    check_exportable(model)
    patched = []
    names = {id(m): n for n, m in model.named_modules()}

    def qdq_forward(q):
        def fwd(x):
            if not q.calibrated:
                raise QDQExportError(f"{names.get(id(q))}: quantizer is not calibrated")
            return _qdq(_Act(q, x, names.get(id(q), "?"), exact_range), x)

        return fwd

    def layer_forward(m):
        name = names.get(id(m), "?")
        wp = _Weight(m, name) if m.w_on and m.w_quant is not None else None

        def fwd(x):
            if not m.quantized:
                return m._op(x, m.float_weight(), m.float_bias())
            if m.a_on and m.in_quant is not None:
                x = m.in_quant(x)
            y = _weighted(wp, x) if wp is not None else m._op(x, m.weight, m.bias)
            if m.out_gamma is not None:  # an unfolded QwT-v2 affine
                shape = [1] * y.dim()
                shape[m.out_channel_dim] = -1
                y = y * m.out_gamma.view(shape) + m.out_beta.view(shape)
            return y

        return fwd

    try:
        for m in model.modules():
            if isinstance(m, Quantizer) and not m.spec.dynamic:
                m.forward = qdq_forward(m)
                patched.append(m)
            elif isinstance(m, _QuantWeighted):
                m.forward = layer_forward(m)
                patched.append(m)
        yield model
    finally:
        for m in patched:
            del m.forward


def _constants_to_initializers(proto):
    """Move every Constant node's tensor into the graph's initializers (unique names)."""
    from onnx import numpy_helper

    g = proto.graph
    keep, k = [], 0
    for node in g.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            t = numpy_helper.to_array(node.attribute[0].t)
            init = numpy_helper.from_array(t, name=node.output[0])
            g.initializer.append(init)
            k += 1
        else:
            keep.append(node)
    del g.node[:]
    g.node.extend(keep)
    return k


@torch.no_grad()
def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path, opset: int = OPSET,
                dynamic_batch: bool = True, exact_range: bool = True) -> dict:
    """Write ``model`` (a uniformly fake-quantized model in its deployment state: frozen or not,
    QwT branches, folded QwT-v2, finalized QFT) as a QDQ ONNX graph; returns graph counts.
    A float model (no quantized module) is exported as is (the FP32 reference)."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    dyn = {"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None
    with export_form(model, exact_range), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=opset, input_names=["input"],
                          output_names=["output"], dynamic_axes=dyn, do_constant_folding=True)
    proto = onnx.load(str(path))
    _constants_to_initializers(proto)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return graph_counts(proto)


def graph_counts(model) -> dict:
    """{"nodes", "initializers", "ops": {op type: count}} of an ONNX model (path or proto)."""
    import onnx

    proto = onnx.load(str(model)) if isinstance(model, (str, Path)) else model
    ops: dict = {}
    for n in proto.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return {"nodes": len(proto.graph.node), "initializers": len(proto.graph.initializer), "ops": dict(sorted(ops.items()))}


def ort_session(path, optimization: str = "all", threads: int = 1, providers=None,
                disabled_optimizers=DISABLED_OPTIMIZERS):
    """An ONNX Runtime session. optimization: "none" (the graph as exported: float ops on
    dequantized values, the exact reference) | "basic" | "extended" | "all" (QDQ fused into integer
    kernels on the CPU)."""
    import onnxruntime as ort

    levels = {"none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    if optimization not in levels:
        raise ConfigError(f"ONNX Runtime optimization {optimization!r}: use one of {sorted(levels)}")
    so = ort.SessionOptions()
    so.graph_optimization_level = levels[optimization]
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=so, providers=providers or ["CPUExecutionProvider"],
                                disabled_optimizers=list(disabled_optimizers or []))


def ort_optimized_ops(path, optimization: str = "all") -> dict:
    """{op type: count} of the graph ONNX Runtime actually runs after its optimizations (shows
    whether QDQ pairs became integer kernels such as MatMulIntegerToFloat / QLinearMatMul)."""
    import tempfile

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimization == "all" else ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        so.log_severity_level = 3
        so.intra_op_num_threads = 1
        ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"],
                             disabled_optimizers=list(DISABLED_OPTIMIZERS))
        return graph_counts(so.optimized_model_filepath)["ops"]


def ort_forward(session):
    """A torch-in, torch-out callable running ``session`` (float32 input named "input")."""

    def fwd(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"input": x.detach().cpu().float().numpy()})[0])

    return fwd
