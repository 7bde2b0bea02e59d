"""ResNet from timm: units are the BasicBlocks / Bottlenecks of layer1..layer4; a batch is an
image tensor. QwT's branch here is a grouped 1x1 conv (``unit_layout = "nchw"``)."""
import torch.nn as nn

from .base import ModelAdapter, PrecondSite, State, Unit

HOMOGENEOUS_ACTS = (nn.ReLU, nn.LeakyReLU, nn.Identity)  # f(y / s) = f(y) / s for s > 0


class TimmResNetAdapter(ModelAdapter):
    unit_layout = "nchw"

    def stem(self, x):
        m = self.model
        return State(m.maxpool(m.act1(m.bn1(m.conv1(x)))))

    def units(self):
        return [Unit(f"layer{i}.{j}") for i in range(1, 5) for j in range(len(getattr(self.model, f"layer{i}")))]

    def head(self, state):
        return self.model.forward_head(state.h)

    def features(self, state):
        return self.model.forward_head(state.h, pre_logits=True)

    def trainable_head(self):
        return ["fc"]

    def edge_layers(self):
        return {"conv1", "fc"}

    def extra_precond(self, sites):
        """"bn_conv": inside a block, BatchNorm -> ReLU -> next conv (bn1 -> conv2 in BasicBlock;
        bn1 -> conv2 and bn2 -> conv3 in Bottleneck). BatchNorm stays float: its weight and bias
        are divided by s (positive factors commute with ReLU); the conv's input columns times s."""
        from ..quant.modules import _QuantWeighted

        if "bn_conv" not in sites:
            return []
        out = []
        for unit in self.units():
            block = self.get(unit.name)
            block = block.block if getattr(block, "wraps_block", False) else block
            chain = [("bn1", ["drop_block", "act1", "aa"], "conv2")] if not hasattr(block, "conv3") else \
                [("bn1", ["act1"], "conv2"), ("bn2", ["drop_block", "act2", "aa"], "conv3")]
            for bn_n, between, conv_n in chain:
                bn, conv = getattr(block, bn_n, None), getattr(block, conv_n, None)
                if type(bn) is not nn.BatchNorm2d or not bn.affine or not isinstance(conv, _QuantWeighted):
                    continue
                if conv.groups != 1 or not all(isinstance(getattr(block, n, None), HOMOGENEOUS_ACTS) or getattr(block, n, None) is None
                                               for n in between):
                    continue
                entries = [(bn, "weight", 0, 0, True), (bn, "bias", 0, 0, True), (conv, "weight", 1, 0, False)]
                out.append(PrecondSite(f"{unit.name}.{bn_n}", "bn_conv", bn.num_features, entries))
        return out
