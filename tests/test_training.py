import pytest
import torch

import neuralode as node


def test_auto_profile_follows_cuda():
    assert node.resolve_profile("auto") == ("gpu" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("name", ["smoke", "cpu", "gpu", " SMOKE "])
def test_named_profiles_pass_through(name):
    assert node.resolve_profile(name) == name.strip().lower()


def test_unknown_profile_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="unknown profile 'fast'.*smoke, cpu, gpu.*NEURALODE_PROFILE"):
        node.resolve_profile("fast")
    with pytest.raises(TypeError):
        node.resolve_profile(None)


def test_default_device_and_seeding():
    assert node.default_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    node.seed_everything(3)
    a = torch.randn(3)
    g = node.seed_everything(3)
    assert torch.equal(a, torch.randn(3))
    assert torch.equal(torch.randn(2, generator=g), torch.randn(2, generator=torch.Generator().manual_seed(3)))
