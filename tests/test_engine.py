"""The core every family uses: adapters reproduce their model's forward exactly, the layer-wise
engine walks units with keyword state (a transformers LlamaDecoderLayer stack, a block that takes
a conditioning vector) and offers local and global targets, and the methods run on both through it."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import make_tiny_resnet, make_tiny_swin, make_tiny_vit
from qwt.compensation import CompContext, apply_variant, method_settings
from qwt.compensation.qwt import QwTBlock
from qwt.engine import LayerwiseEngine, run_chain
from qwt.models import AdaptedModel, ModelAdapter, State, Unit, adapter_for
from qwt.models.base import FloatView
from qwt.ptq import apply_ptq, get_specs
from qwt.ptq.gptq import input_groups
from qwt.quant import set_quant_state
from qwt.quant.modules import _QuantWeighted, float_view

transformers = pytest.importorskip("transformers")


# ---------------------------------------------------------------------------------------------
# two non-classification block signatures


def make_tiny_llama(layers=2, hidden=32, heads=4, kv_heads=4, vocab=64, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=64)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms (init is all ones)
        for mod in m.modules():
            if type(mod).__name__ == "LlamaRMSNorm":
                mod.weight.uniform_(0.5, 1.5)
    return m


def llama_batches(n=8, t=12, vocab=64, seed=1, bs=4):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, t), generator=g)
    return [ids[i:i + bs] for i in range(0, n, bs)]


class CondBlock(nn.Module):
    """adaLN-style block: block(x, c) with a conditioning vector c (as a DiT block)."""

    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d, elementwise_affine=False)
        self.ada = nn.Linear(d, 2 * d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x, c):
        shift, scale = self.ada(F.silu(c)).chunk(2, -1)
        h = self.norm(x) * (1 + scale[:, None]) + shift[:, None]
        return x + self.fc2(F.gelu(self.fc1(h)))


class CondNet(AdaptedModel):
    adapter_class = "test_engine:CondNetAdapter"

    def __init__(self, d=16, tokens=6, classes=5, depth=3):
        super().__init__()
        self.embed = nn.Linear(4, d)
        self.label = nn.Embedding(classes, d)
        self.blocks = nn.ModuleList(CondBlock(d) for _ in range(depth))
        self.out = nn.Linear(d, 4)

    def forward(self, batch):
        x, y = batch
        h, c = self.embed(x), self.label(y)
        for b in self.blocks:
            h = b(h, c)
        return self.out(h)


class CondNetAdapter(ModelAdapter):
    def stem(self, batch):
        x, y = batch
        return State(self.model.embed(x), {"c": self.model.label(y)})

    def units(self):
        return [Unit(f"blocks.{i}") for i in range(len(self.model.blocks))]

    def head(self, state):
        return self.model.out(state.h)

    def weight_only_layers(self):
        return {f"blocks.{i}.ada" for i in range(len(self.model.blocks))}


def cond_batches(n=16, bs=8, seed=2):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 6, 4, generator=g), torch.randint(0, 5, (n,), generator=g)
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, n, bs)]


def settings(**over):
    s = method_settings()
    s["qwt_star"]["qwt"] = s["qwt"]
    for k, v in over.items():
        s[k].update(v)
    return s


def ctx_for(adapter, fp_adapter, batches):
    def calib(n, transform, batch_size, shard=False):
        return batches

    return CompContext(adapter, fp_adapter, calib, None, "cpu", log=lambda *_: None)


def logits_err(adapter, fp_model, batches, fwd):
    with torch.no_grad():
        return sum(float((adapter.forward(b) - fwd(fp_model, b)).pow(2).mean()) for b in batches)


def llama_fwd(model, b):
    return model(b).logits


def cond_fwd(model, b):
    return model(b)


# ---------------------------------------------------------------------------------------------
# adapters reproduce their model's forward exactly


PARITY = {
    "vit": (lambda: make_tiny_vit(), lambda: torch.randn(3, 1, 8, 8), lambda m, b: m(b)),
    "vit_distilled": (lambda: make_tiny_vit(distilled=True), lambda: torch.randn(3, 1, 8, 8), lambda m, b: m(b)),
    "swin": (lambda: make_tiny_swin(img=16), lambda: torch.randn(3, 1, 16, 16), lambda m, b: m(b)),
    "resnet": (lambda: make_tiny_resnet(), lambda: torch.randn(3, 1, 16, 16), lambda m, b: m(b)),
    "resnet_bottleneck": (lambda: make_tiny_resnet(bottleneck=True), lambda: torch.randn(3, 1, 16, 16), lambda m, b: m(b)),
    "llama": (lambda: make_tiny_llama(), lambda: llama_batches()[0], llama_fwd),
    "llama_gqa": (lambda: make_tiny_llama(kv_heads=2), lambda: llama_batches()[0], llama_fwd),
    "conditioned": (lambda: CondNet().eval(), lambda: cond_batches()[0], cond_fwd),
}


@pytest.mark.parametrize("name", sorted(PARITY))
def test_adapter_reproduces_the_models_forward_exactly(name):
    make, batch, fwd = PARITY[name]
    torch.manual_seed(0)
    model, b = make(), batch()
    a = adapter_for(model)
    with torch.no_grad():
        torch.testing.assert_close(a.forward(b), fwd(model, b), rtol=0, atol=0)
        # and step by step through the engine's chain
        s, hs = run_chain(a, b, keep_units=True)
        assert len(hs) == len(a.units())
        torch.testing.assert_close(a.head(s), fwd(model, b), rtol=0, atol=0)


def test_llama_padding_mask_reaches_the_layers():
    model = make_tiny_llama()
    ids = llama_batches()[0]
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    a = adapter_for(model)
    with torch.no_grad():
        torch.testing.assert_close(a.forward({"input_ids": ids, "attention_mask": mask}),
                                   model(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# the engine: keyword state, local and global targets


@pytest.fixture(scope="module")
def llama_case():
    fp = make_tiny_llama()
    q = adapter_for(copy.deepcopy(fp))
    apply_ptq(q, get_specs("rtn", 4, 4), llama_batches())
    return fp, q


def test_engine_targets_on_a_llama_stack(llama_case):
    fp, q = llama_case
    batches = llama_batches()
    fpa = adapter_for(fp)
    fp_states = [fpa.stem(b) for b in batches]
    q_states = [q.stem(b) for b in batches]
    for seg in LayerwiseEngine(q, batches, fp_chain=True):
        for i, (x, kw, y_fp, y_q) in enumerate(seg.unit_pairs("global")):
            # the FP chain's own output of this layer, and the quantized layer on the quantized chain
            torch.testing.assert_close(y_fp, fpa.run_unit(seg.unit, fp_states[i]).h, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(y_q, q.run_unit(seg.unit, q_states[i]).h, rtol=0, atol=0)
            assert "position_embeddings" in kw and "attention_mask" in kw
        for i, (x, kw, y_fp, y_q) in enumerate(seg.unit_pairs("local")):
            with float_view(q.model):
                torch.testing.assert_close(y_fp, q.run_unit(seg.unit, q_states[i]).h, rtol=0, atol=0)
        fp_states = [fpa.run_unit(seg.unit, s) for s in fp_states]
        q_states = [q.run_unit(seg.unit, s) for s in q_states]


def test_engine_offload_to_cpu_gives_the_same_walk(llama_case):
    _, q = llama_case
    batches = llama_batches()
    a = [[y_q for *_, y_q in seg.unit_pairs()] for seg in LayerwiseEngine(q, batches)]
    b = [[y_q for *_, y_q in seg.unit_pairs()] for seg in LayerwiseEngine(q, batches, store="cpu", device=torch.device("cpu"))]
    for ya, yb in zip(a, b):
        for u, v in zip(ya, yb):
            torch.testing.assert_close(u, v, rtol=0, atol=0)


@pytest.mark.parametrize("target", ["local", "global"])
def test_qwt_on_a_llama_stack(llama_case, target):
    fp, q = llama_case
    batches = llama_batches()
    comp = q.clone()
    info = apply_variant(ctx_for(comp, adapter_for(fp), batches), "qwt", settings(qwt={"target": target}))["qwt"]
    assert info["target"] == target and info["blocks_compensated"] >= 1
    assert any(isinstance(m, QwTBlock) for m in comp.model.modules())
    assert logits_err(comp, fp, batches, llama_fwd) < logits_err(q, fp, batches, llama_fwd)
    with torch.no_grad(), float_view(comp.model):  # the float path is still the FP model
        torch.testing.assert_close(comp.forward(batches[0]), llama_fwd(fp, batches[0]), rtol=1e-5, atol=1e-5)


def test_global_target_fits_the_accumulated_error(llama_case):
    """The global target of layer k is the FP chain's output, so the fitted residual includes what
    the upstream layers got wrong; the local target only the layer's own error."""
    fp, q = llama_case
    batches = llama_batches()
    err = {}
    for seg in LayerwiseEngine(q, batches, fp_chain=True):
        for t in ("local", "global"):
            err[seg.index, t] = sum(float((y_fp - y_q).pow(2).sum()) for *_, y_fp, y_q in seg.unit_pairs(t))
    assert err[0, "local"] == pytest.approx(err[0, "global"], rel=1e-5)  # layer 0: the same input on both chains
    assert err[1, "global"] > err[1, "local"]


@pytest.mark.parametrize("variant", ["qwt_v2", "qft"])
def test_other_methods_walk_a_llama_stack(llama_case, variant):
    fp, q = llama_case
    batches = llama_batches()
    comp = q.clone()
    s = settings(qwt_v2={"target": "global"}, qft={"epochs": 2, "batch_size": 4, "num_samples": 8, "eval_loss": True})
    info = apply_variant(ctx_for(comp, adapter_for(fp), batches), variant, s)[variant]
    if variant == "qwt_v2":
        n = sum(isinstance(m, _QuantWeighted) for m in comp.model.modules())
        assert info["layers_folded"] == n == 2 * 7
        assert logits_err(comp, fp, batches, llama_fwd) < logits_err(q, fp, batches, llama_fwd)
    else:
        assert info["precond_sites"]["ln_linear"] == 2 * 2 and info["precond_sites"]["v_proj"] == 2
        assert info["loss_after"] < info["loss_before"]


def test_repq_vit_folds_into_rmsnorm_without_a_bias():
    from qwt.ptq.repq_vit import NormWithBias

    fp = make_tiny_llama()
    q = adapter_for(copy.deepcopy(fp))
    apply_ptq(q, get_specs("repq_vit", 4, 4), llama_batches())
    norms = [m for m in q.model.modules() if isinstance(m, NormWithBias)]
    assert len(norms) == 2 * 2  # input_layernorm and post_attention_layernorm of both layers
    b = llama_batches()[0]
    with torch.no_grad(), float_view(q.model):  # the fold is an exact identity in float
        torch.testing.assert_close(q.forward(b), llama_fwd(fp, b), rtol=1e-4, atol=1e-5)


def test_gptq_groups_layers_that_read_the_same_input(llama_case):
    fp = make_tiny_llama()
    q = adapter_for(copy.deepcopy(fp))
    info = apply_ptq(q, get_specs("gptq", 4, 16), llama_batches(), settings={})
    assert info["gptq_layers"] == 2 * 7 and info["weight_only"]
    walk = iter(LayerwiseEngine(q, llama_batches()))
    seg = next(walk)
    assert seg.unit.name == "model.layers.0"
    groups = [[n.rsplit(".", 1)[-1] for n, _ in g] for g in input_groups(seg, seg.layers())]
    assert groups == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]
    assert logits_err(q, fp, llama_batches(), llama_fwd) > 0


# ---------------------------------------------------------------------------------------------
# a block with a conditioning vector


def test_conditioned_blocks_through_the_engine():
    torch.manual_seed(0)
    fp = CondNet().eval()
    q = adapter_for(copy.deepcopy(fp))
    batches = cond_batches()
    apply_ptq(q, get_specs("rtn", 4, 4), batches)
    ada = q.get("blocks.0.ada")
    assert ada.in_quant is None and ada.w_quant is not None  # the adapter's weight-only layer
    for variant in ("qwt", "qwt_v2"):
        comp = q.clone()
        apply_variant(ctx_for(comp, adapter_for(fp), batches), variant, settings())
        assert logits_err(comp, fp, batches, cond_fwd) < logits_err(q, fp, batches, cond_fwd), variant
    # the branch sees x only; the conditioning passes through to the block unchanged
    comp = q.clone()
    apply_variant(ctx_for(comp, adapter_for(fp), batches), "qwt", settings())
    blk = comp.get("blocks.1")
    assert isinstance(blk, QwTBlock)
    x, c = torch.randn(2, 6, 16), torch.randn(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(blk(x, c=c), blk.block(x, c) + blk.branch_out(x), rtol=0, atol=0)


def test_float_view_teacher_is_the_fp_model():
    torch.manual_seed(0)
    fp = CondNet().eval()
    q = adapter_for(copy.deepcopy(fp))
    batches = cond_batches()
    apply_ptq(q, get_specs("rtn", 4, 4), batches)
    view = FloatView(q)
    with torch.no_grad():
        torch.testing.assert_close(view.forward(batches[0]), fp(batches[0]), rtol=0, atol=0)
        set_quant_state(q.model, True, True)
        assert not torch.allclose(q.forward(batches[0]), fp(batches[0]))  # the view restored the states
