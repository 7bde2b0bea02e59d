"""The layer-wise engine: one walk of a model's segments over calibration batches, shared by every
method that needs per-unit or per-layer data (stage-1 range observation, GPTQ, QwT, QwT-v2) and
the chain forward used by the distillation losses (QwT*, QFT).

A model is seen through its adapter as segments: ``stem`` (batch -> State), one per unit
(State -> State) and ``head`` (State -> output). The engine keeps one input per calibration batch
for the current segment, yields the segment to the method, and after the method is done (it may
have replaced the unit, folded layers, quantized weights) runs every input through the segment to
get the next segment's inputs. Two chains can be kept:

  quantized chain  the model as it is now (upstream already quantized / compensated);
  FP chain         (``fp_chain=True``) the same model's float path, every wrapper and compensation
                   off (``float_view``): the FP model's own activations at this point.

Two fitting targets follow (``Segment.unit_pairs``):
  local   FP output of the unit on the quantized chain's input (QwT on vision, the papers' text);
  global  the FP chain's own output of the unit (QwT on LLaMA in the reference code, QwT-v2).

Memory: ``store="cpu"`` keeps the cached inputs on the CPU between segments and moves one batch
at a time to the compute device, so peak device memory is one segment's modules plus one batch
(plus the model, which stays where it is).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from . import dist
from .models.base import ModelAdapter, State, Unit, move
from .quant.modules import float_view


class Segment:
    """One segment of the walk. ``kind``: "stem" | "unit" | "head"; ``unit`` for unit segments."""

    def __init__(self, engine: "LayerwiseEngine", kind: str, index: int, unit: Unit | None):
        self.engine, self.kind, self.index, self.unit = engine, kind, index, unit
        self._layers = None

    @property
    def name(self) -> str:
        return self.unit.name if self.unit is not None else self.kind

    @property
    def adapter(self) -> ModelAdapter:
        return self.engine.adapter

    # -- running --------------------------------------------------------------------------
    def run(self, inp):
        """The segment's forward on one input, with the model's current quantization state."""
        a = self.adapter
        if self.kind == "stem":
            return a.stem(inp)
        if self.kind == "head":
            return a.head(inp)
        return a.run_unit(self.unit, inp)

    def run_float(self, inp):
        with float_view(self.adapter.model):
            return self.run(inp)

    def inputs(self) -> Iterator[Any]:
        """This segment's input for every calibration batch, on the compute device (quantized chain)."""
        for inp in self.engine._q:
            yield self.engine._load(inp)

    def fp_inputs(self) -> Iterator[Any]:
        if self.engine._fp is None:
            raise RuntimeError("this walk keeps no FP chain: create the engine with fp_chain=True")
        for inp in self.engine._fp:
            yield self.engine._load(inp)

    # -- units ----------------------------------------------------------------------------
    @property
    def module(self) -> nn.Module:
        return self.adapter.get(self.unit.name)

    def replace(self, module: nn.Module) -> None:
        """Put ``module`` in the unit's place; the walk continues through it."""
        self.adapter.set_module(self.unit.name, module)

    def unit_inputs(self, chain: str = "q") -> Iterator[tuple[Any, dict]]:
        """(x, kwargs) the unit's block receives (after its ``pre``), per batch."""
        for state in (self.inputs() if chain == "q" else self.fp_inputs()):
            yield self.adapter.unit_input(self.unit, state)

    def call(self, x, kwargs, quantized: bool = True):
        """The unit's block on (x, kwargs): quantized (the model's state) or its float path."""
        if quantized:
            return self.adapter.call_unit(self.unit, x, kwargs)
        with float_view(self.adapter.model):
            return self.adapter.call_unit(self.unit, x, kwargs)

    def unit_pairs(self, target: str = "local") -> Iterator[tuple[Any, dict, torch.Tensor, torch.Tensor]]:
        """(x, kwargs, y_fp, y_q) per batch: x the quantized chain's unit input, y_q the quantized
        unit's output on it, y_fp the target (see the module docstring)."""
        if target == "local":
            for x, kw in self.unit_inputs():
                yield x, kw, self.call(x, kw, quantized=False), self.call(x, kw)
        elif target == "global":
            for (x, kw), (xf, kwf) in zip(self.unit_inputs(), self.unit_inputs("fp")):
                yield x, kw, self.call(xf, kwf, quantized=False), self.call(x, kw)
        else:
            raise ValueError(f"unknown target {target!r}: use 'local' or 'global'")

    # -- layers ---------------------------------------------------------------------------
    def layers(self, types: tuple[type, ...] | None = None) -> list[tuple[str, nn.Module]]:
        """(name, module) of the modules of ``types`` (default: quantized Linear / Conv) that run in
        this segment, in execution order (found by running the first input once, hooks on)."""
        from .quant.modules import _QuantWeighted

        types = types or (_QuantWeighted,)
        names = {m: n for n, m in self.adapter.model.named_modules() if isinstance(m, types)}
        order: list = []
        hooks = [m.register_forward_hook(lambda mod, i, o: order.append(mod) if mod not in order else None) for m in names]
        try:
            with torch.no_grad():
                self.run(next(self.inputs()))
        finally:
            for h in hooks:
                h.remove()
        return [(names[m], m) for m in order]


class LayerwiseEngine:
    """Walk ``adapter``'s segments over ``batches`` (see the module docstring).

    kinds: which segment kinds are yielded ("stem", "unit", "head"); the others still run.
    store: where the cached inputs live between segments ("cpu" to offload; None: where they are).
    fp_chain: also keep the FP chain's inputs (for global targets).
    finish: also run the head on every input at the end (a pass whose hooks / observers must see
    the whole model); otherwise the walk stops after the last yielded segment.
    """

    def __init__(self, adapter: ModelAdapter, batches: list, *, kinds=("unit",), fp_chain: bool = False,
                 store: str | torch.device | None = None, device: torch.device | None = None, desc: str | None = None,
                 finish: bool = False):
        self.adapter, self.batches = adapter, list(batches)
        self.kinds = tuple(kinds)
        self.fp_chain = fp_chain
        self.store = None if store in (None, "device", "none") else torch.device(store)
        self.device = device
        self.desc = desc
        self.finish = finish
        self._q = self._fp = None

    def _keep(self, x):
        return move(x, self.store) if self.store is not None else x

    def _load(self, x):
        if self.device is not None:
            return move(x, self.device)
        return x

    def segments(self) -> list[Segment]:
        segs = [Segment(self, "stem", -1, None)]
        segs += [Segment(self, "unit", i, u) for i, u in enumerate(self.adapter.units())]
        segs.append(Segment(self, "head", len(segs) - 1, None))
        return segs

    def __iter__(self) -> Iterator[Segment]:
        self._q = [self._keep(b) for b in self.batches]
        self._fp = list(self._q) if self.fp_chain else None
        segs = self.segments()
        last = len(segs) - 1 if self.finish else max((i for i, s in enumerate(segs) if s.kind in self.kinds), default=-1)
        shown = [s for s in segs if s.kind in self.kinds]
        bar = tqdm(total=len(shown), desc=self.desc, disable=self.desc is None or not dist.is_main(), leave=False)
        try:
            for i, seg in enumerate(segs):
                if seg.kind in self.kinds:
                    yield seg
                    bar.update(1)
                if i >= last and not self.finish:
                    break
                with torch.no_grad():
                    self._q = [self._keep(seg.run(self._load(inp))) for inp in self._q]
                    if self._fp is not None:
                        with float_view(self.adapter.model):
                            self._fp = [self._keep(seg.run(self._load(inp))) for inp in self._fp]
        finally:
            bar.close()
            self._q = self._fp = None


def run_chain(adapter: ModelAdapter, batch, keep_units: bool = False) -> tuple[State, list]:
    """One forward through stem and units: (final state, [each unit's output] if keep_units).
    The distillation losses (QwT*, QFT's block loss) read ``adapter.head`` / ``adapter.features``
    of the final state."""
    s = adapter.stem(batch)
    hs = []
    for u in adapter.units():
        s = adapter.run_unit(u, s)
        if keep_units:
            hs.append(s.h)
    return s, hs


def capture_outputs(modules: dict[str, nn.Module], run: Callable[[], Any], stop_at: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Run ``run()`` with forward hooks that keep each module's output ({name: output});
    ``stop_at``: end the forward right after that module (nothing downstream runs)."""
    out: dict[str, torch.Tensor] = {}

    class _Stop(Exception):
        pass

    def make(name):
        def hook(mod, args, o):
            out[name] = o
            if mod is stop_at:
                raise _Stop

        return hook

    handles = [m.register_forward_hook(make(n)) for n, m in modules.items()]
    try:
        run()
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return out
