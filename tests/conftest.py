"""Shared fixtures: tiny random timm models of every family, and the embedded model config."""
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# one thread: with 2 threads on a 2-core machine, any other busy process makes every op wait on a
# descheduled OpenMP thread (measured 60x slower); one thread is predictable everywhere
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_tiny_vit(depth=2, dim=32, heads=4, img=8, patch=2, chans=1, classes=10, distilled=False):
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    from qwt.models.zoo import disable_fused_attention

    cls = VisionTransformerDistilled if distilled else VisionTransformer
    m = cls(img_size=img, patch_size=patch, in_chans=chans, num_classes=classes, embed_dim=dim, depth=depth, num_heads=heads)
    return disable_fused_attention(m.eval())


def make_tiny_swin(img=32, chans=1, classes=10):
    from timm.models.swin_transformer import SwinTransformer

    from qwt.models.zoo import disable_fused_attention

    m = SwinTransformer(img_size=img, patch_size=2, in_chans=chans, num_classes=classes, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4)
    return disable_fused_attention(m.eval())


def make_tiny_resnet(chans=1, classes=10, bottleneck=False):
    from timm.models.resnet import BasicBlock, Bottleneck, ResNet

    block = Bottleneck if bottleneck else BasicBlock
    return ResNet(block=block, layers=[1, 1, 1, 1], channels=(16, 32, 64, 128), stem_width=16, in_chans=chans, num_classes=classes).eval()


@pytest.fixture
def tiny_vit():
    return make_tiny_vit()


@pytest.fixture
def tiny_swin():
    return make_tiny_swin()


@pytest.fixture
def tiny_resnet():
    return make_tiny_resnet()


def embedded_model_cfg(name="embedded_vit") -> dict:
    """The embedded model config as the runner sees it."""
    return yaml.safe_load((ROOT / "configs" / "model" / f"{name}.yaml").read_text())


def embedded_data_cfg(**over) -> dict:
    from qwt.tasks.classification import embedded_data_cfg as cfg

    return cfg(**over)


@pytest.fixture(scope="session")
def embedded_vit():
    """The embedded ViT with its shipped weights, and its data (digits in the wild)."""
    from qwt.models.zoo import build_model
    from qwt.tasks.classification import build_data

    cfg = embedded_model_cfg("embedded_vit")
    return build_model(cfg), build_data(embedded_data_cfg(), cfg)
