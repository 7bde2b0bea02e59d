"""ResNet from timm: units are the BasicBlocks / Bottlenecks of layer1..layer4."""
from timm.models.resnet import ResNet

from .base import ModelAdapter, Unit, register_adapter


@register_adapter(ResNet)
class TimmResNetAdapter(ModelAdapter):
    family = "resnet"
    unit_layout = "nchw"

    def stem(self, x):
        m = self.model
        return m.maxpool(m.act1(m.bn1(m.conv1(x))))

    def units(self):
        return [Unit(f"layer{i}.{j}") for i in range(1, 5) for j in range(len(getattr(self.model, f"layer{i}")))]

    def head(self, h):
        return self.model.forward_head(h)

    def pre_logits(self, h):
        return self.model.forward_head(h, pre_logits=True)

    def classifier_names(self):
        return ["fc"]

    def eight_bit_layers(self):
        return {"conv1", "fc"}
