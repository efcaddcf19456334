"""The built-in model zoo (trained checkpoints live in ``tvm_lowbit/zoo``)."""

from tvm_lowbit.models.mobilenet import MobileNetV2, mobilenet
from tvm_lowbit.models.resnet import ResNet, load_pretrained, resnet20

__all__ = ["ResNet", "resnet20", "MobileNetV2", "mobilenet", "load_pretrained"]
