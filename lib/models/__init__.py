"""Classifiers ([0, 1] images in, logits out, normalisation inside) and the registry that builds them by name."""
from lib.models.base import ImageClassifier, Normalize
from lib.models.googlenet import GoogLeNet, Inception
from lib.models.imagenet import IMAGENET_MEAN, IMAGENET_STD, InceptionInputTransform
from lib.models.lenet import LeNet5, LeNet5Classic
from lib.models.resnet_cifar import BasicBlock, Bottleneck, PadShortcut, ResNet, ResNetCifar
from lib.models.small import LisaCNN, SmallCNN, SmallVGG
from lib.models.vgg import VGG, VGG_CONFIGS
from lib.models.wideresnet import WideBasic, WideResNet
from lib.models.zoo import (ARCH_KEYWORDS, ARCHITECTURES, build_classifier, classifier_from_spec, count_parameters,
                            scale_channels)

__all__ = [
    "ARCH_KEYWORDS", "ARCHITECTURES", "BasicBlock", "Bottleneck", "GoogLeNet", "IMAGENET_MEAN", "IMAGENET_STD", "ImageClassifier",
    "Inception", "InceptionInputTransform", "LeNet5", "LeNet5Classic", "LisaCNN", "Normalize", "PadShortcut",
    "ResNet", "ResNetCifar", "SmallCNN", "SmallVGG", "VGG", "VGG_CONFIGS", "WideBasic", "WideResNet",
    "build_classifier", "classifier_from_spec", "count_parameters", "scale_channels",
]
