import pytest
import torch

import neuralode as node
from neuralode.nets import CLASSIFIERS


@pytest.mark.parametrize("kind, expected", [("mlp", 238_510), ("resnet", 576_778), ("rknet", 208_266),
                                            ("odenet", 208_266)])
def test_reference_mnist_parameter_counts(kind, expected):
    # The paper's Table 1: MLP 0.24 M, ResNet 0.60 M, RK-Net and ODE-Net 0.22 M.
    model = node.make_classifier(kind)
    assert node.count_parameters(model) == expected


def test_odenet_has_fewer_than_half_the_resnets_parameters():
    assert 2 * node.count_parameters(node.make_classifier("odenet")) < node.count_parameters(
        node.make_classifier("resnet"))


@pytest.mark.parametrize("image_size", [28, 8])
@pytest.mark.parametrize("kind", CLASSIFIERS)
def test_classifiers_map_images_to_logits(kind, image_size):
    torch.manual_seed(0)
    model = node.make_classifier(kind, image_size=image_size, channels=16)
    logits = model(torch.randn(3, 1, image_size, image_size))
    assert logits.shape == (3, 10) and torch.isfinite(logits).all()


def test_concat_conv_sees_time_as_a_channel():
    torch.manual_seed(0)
    conv = node.ConcatConv2d(2, 4)
    z = torch.randn(1, 2, 5, 5)
    manual = conv.conv(torch.cat([torch.full((1, 1, 5, 5), 0.3), z], dim=1))
    assert torch.allclose(conv(torch.tensor(0.3), z), manual)
    assert not torch.allclose(conv(torch.tensor(0.0), z), conv(torch.tensor(1.0), z))


def test_rknet_takes_fixed_rk4_steps_and_odenet_adapts():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 28, 28)
    rknet, odenet = node.make_classifier("rknet", channels=16), node.make_classifier("odenet", channels=16)
    rknet(x)
    odenet(x)
    assert rknet[1].nfe == 4 * 4  # four RK4 steps of 0.25, four evaluations each
    assert odenet[1].nfe >= 8 and odenet[1].stats.n_accepted >= 1


def test_unknown_classifier():
    with pytest.raises(ValueError, match="unknown kind 'vgg'.*odenet"):
        node.make_classifier("vgg")
