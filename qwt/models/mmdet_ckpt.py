"""Checkpoints of mmdet detectors: safe loading under torch >= 2.6 and the mmdet 2 -> 3 Swin layout.

torch >= 2.6 loads with ``weights_only=True``; mmdet / mmengine checkpoints carry a few non-tensor
objects in their ``meta`` / ``message_hub`` (numpy arrays and scalars, mmengine's HistoryBuffer),
so mmengine 0.10's ``torch.load(filename)`` fails on them. We do not switch the restricted
unpickler off: ``load_checkpoint_file`` keeps ``weights_only=True`` and allow-lists exactly those
globals for this one call (``checkpoint_safe_globals``); anything else in a file is an error that
names the global and the explicit opt-in (``model.trust_checkpoint=true``, which loads that one
file with ``weights_only=False``). ``mmengine_safe_loading()`` applies the same allow-list while
mmengine's own loader runs (e.g. a ``load_from`` of the user's), for the duration of the block only.

The QwT detection checkpoints (Swin-Transformer-Object-Detection, mmdet 2) name the backbone like
the original Swin (``backbone.layers.i.blocks.j.attn.qkv``, ``mlp.fc1``, ``patch_embed.proj``) and
their PatchMerging concatenates the 2x2 neighbours as [x(0,0), x(1,0), x(0,1), x(1,1)] before the
norm and the reduction, while mmdet 3's ``nn.Unfold`` gives channel-major order (c * 4 + k,
k = (0,0), (0,1), (1,0), (1,1)). ``convert_mmdet2_swin`` renames the keys and permutes the
PatchMerging norm and reduction; necks and heads keep their names.
"""
from __future__ import annotations

import contextlib
import os
import pickle
from collections import OrderedDict

import torch

from ..errors import ConfigError


def checkpoint_safe_globals() -> list:
    """The non-tensor globals mmdet / mmengine checkpoints legitimately contain."""
    import numpy as np

    out = []
    mods = []
    for name in ("numpy.core.multiarray", "numpy._core.multiarray"):
        try:
            mods.append((name, __import__(name, fromlist=["_reconstruct"])))
        except ImportError:
            pass
    for modname, mod in mods:
        for attr in ("_reconstruct", "scalar"):
            fn = getattr(mod, attr, None)
            if fn is not None:
                out.append((fn, f"{modname}.{attr}"))
    out += [np.ndarray, np.dtype]
    # numpy >= 1.25 pickles dtypes through their classes (numpy.dtypes.Float64DType, ...)
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        out += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType") and isinstance(getattr(dtypes, n), type)]
    # numpy scalars carry their raw bytes
    out.append(bytes)
    try:
        from mmengine.logging.history_buffer import HistoryBuffer

        # a HistoryBuffer pickles its statistics-method table as getattr(HistoryBuffer, "mean"), ...;
        # the restricted unpickler still calls (REDUCE) nothing but allow-listed callables, so
        # getattr only looks attributes up, it cannot make anything else callable
        out += [HistoryBuffer, getattr]
    except ImportError:  # pragma: no cover - mmengine is the family's dependency
        pass
    return out


@contextlib.contextmanager
def mmengine_safe_loading():
    """Within the block, ``torch.load(..., weights_only=True)`` (mmengine's loader included) accepts
    the globals of ``checkpoint_safe_globals`` and nothing more; outside it nothing changes."""
    with torch.serialization.safe_globals(checkpoint_safe_globals()):
        yield


def load_checkpoint_file(path: str, trust: bool = False, option: str = "model.checkpoint") -> dict:
    """The state dict of a detector checkpoint (``state_dict`` / ``model`` entry or the file itself)."""
    if not path or not os.path.isfile(str(path)):
        raise ConfigError(f"{option}={path} does not exist: give the path of the detector's checkpoint (.pth)")
    try:
        if trust:  # the explicit opt-in for one file the user trusts
            ckpt = torch.load(str(path), map_location="cpu", weights_only=False)
        else:
            with mmengine_safe_loading():
                ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        bad = ""
        try:
            bad = ", ".join(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
        except Exception:  # noqa: BLE001 - only for the message
            pass
        raise ConfigError(f"{option}={path} holds objects outside the allow-list of safe checkpoint globals"
                          f"{' (' + bad + ')' if bad else ''}; torch loads checkpoints with weights_only=True. "
                          "If you trust this file, set model.trust_checkpoint=true to load it with "
                          "weights_only=False") from e
    except Exception as e:  # corrupt / not a checkpoint
        raise ConfigError(f"{option}={path} is not a readable checkpoint ({type(e).__name__}: {str(e)[:160]})") from e
    if isinstance(ckpt, dict) and "state_dict" in ckpt:
        ckpt = ckpt["state_dict"]
    elif isinstance(ckpt, dict) and "model" in ckpt and isinstance(ckpt["model"], dict):
        ckpt = ckpt["model"]
    if not isinstance(ckpt, dict):
        raise ConfigError(f"{option}={path} holds a {type(ckpt).__name__}, not a state dict")
    state = OrderedDict((k[7:] if k.startswith("module.") else k, v) for k, v in ckpt.items())
    return state


def is_mmdet2_swin(state: dict) -> bool:
    return any(k.startswith("backbone.layers.") for k in state)


def _unfold_reduction(w: torch.Tensor) -> torch.Tensor:
    """(out, 4C) reduction weight from [x0, x1, x2, x3] blocks to nn.Unfold's channel-major order."""
    out_c, in_c = w.shape
    return w.reshape(out_c, 4, in_c // 4)[:, [0, 2, 1, 3], :].transpose(1, 2).reshape(out_c, in_c)


def _unfold_norm(v: torch.Tensor) -> torch.Tensor:
    in_c = v.shape[0]
    return v.reshape(4, in_c // 4)[[0, 2, 1, 3], :].transpose(0, 1).reshape(in_c)


def convert_mmdet2_swin(state: dict) -> OrderedDict:
    """mmdet 2 / original-Swin backbone keys -> mmdet 3 ``SwinTransformer`` keys (other keys kept)."""
    out = OrderedDict()
    for k, v in state.items():
        if not k.startswith("backbone."):
            out[k] = v
            continue
        b = k[len("backbone."):]
        if b.startswith("layers."):
            if "attn_mask" in b:
                continue  # a buffer some Swin versions saved; mmdet 3 rebuilds the mask per input
            if ".attn." in b:
                b = b.replace(".attn.", ".attn.w_msa.")
            elif ".mlp.fc1." in b:
                b = b.replace(".mlp.fc1.", ".ffn.layers.0.0.")
            elif ".mlp.fc2." in b:
                b = b.replace(".mlp.fc2.", ".ffn.layers.1.")
            elif ".downsample." in b:
                if ".reduction." in b:
                    v = _unfold_reduction(v)
                elif ".norm." in b:
                    v = _unfold_norm(v)
            b = "stages." + b[len("layers."):]
        elif b.startswith("patch_embed.proj."):
            b = b.replace("patch_embed.proj.", "patch_embed.projection.")
        out["backbone." + b] = v
    return out


def load_detector_weights(model: torch.nn.Module, path: str, trust: bool = False, layout: str = "auto",
                          option: str = "model.checkpoint") -> str:
    """Load a checkpoint into an mmdet detector (strict); returns the layout it had ("mmdet2" / "mmdet3")."""
    state = load_checkpoint_file(path, trust=trust, option=option)
    if layout not in ("auto", "mmdet2", "mmdet3"):
        raise ConfigError(f"model.checkpoint_layout={layout!r}: use auto, mmdet2 or mmdet3")
    found = "mmdet2" if (layout == "mmdet2" or (layout == "auto" and is_mmdet2_swin(state))) else "mmdet3"
    if found == "mmdet2":
        state = convert_mmdet2_swin(state)
    want = model.state_dict()
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    if missing or unexpected:
        raise ConfigError(f"{option}={path} ({found} layout) does not fit this detector: {len(missing)} missing keys "
                          f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}). Give the "
                          "checkpoint of this model (model=...), or set model.checkpoint_layout")
    bad = [k for k in want if tuple(want[k].shape) != tuple(state[k].shape)]
    if bad:
        raise ConfigError(f"{option}={path}: shapes differ for {len(bad)} tensors (e.g. {bad[0]}: "
                          f"{tuple(state[bad[0]].shape)} vs {tuple(want[bad[0]].shape)}); give the checkpoint of this model")
    model.load_state_dict(state, strict=True)
    return found
