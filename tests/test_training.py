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


def test_saved_tensor_bytes_counts_a_tensor_saved_twice_once():
    # tanh saves its output y, and y * y saves y twice more: three saves, one storage.
    x = torch.randn(1000, dtype=torch.float64, requires_grad=True)
    nbytes = 1000 * 8
    assert node.saved_tensor_bytes(lambda: (x.tanh() * x.tanh()).sum()) == 2 * nbytes  # two tanh outputs
    assert node.saved_tensor_bytes(lambda: (lambda y: y * y)(x.tanh()).sum()) == nbytes
    assert node.saved_tensor_bytes(lambda: (lambda y: y * y)(x.tanh()).sum(), peak=True) == nbytes


def test_saved_tensor_bytes_counts_views_of_one_parameter_once_at_its_full_size():
    w = torch.randn(10, 100, dtype=torch.float64, requires_grad=True)
    s = torch.randn(10, 50, dtype=torch.float64, requires_grad=True)

    def five_evaluations():  # a parameter sliced and saved at every evaluation, as in ConcatLinear
        return sum((w[:, :50] * s).sum() for _ in range(5))

    assert node.saved_tensor_bytes(five_evaluations) == w.numel() * 8 + s.numel() * 8


def test_saved_tensor_bytes_counts_a_storage_again_once_it_was_released():
    # Three graphs, each freed by its backward before the next is built: the allocator may hand the
    # same address to the next one, which must still count (total), while the peak is one graph.
    x = torch.randn(1000, dtype=torch.float64, requires_grad=True)

    def three_steps():
        for _ in range(3):
            x.tanh().sum().backward()

    assert node.saved_tensor_bytes(three_steps) == 3 * 1000 * 8
    assert node.saved_tensor_bytes(three_steps, peak=True) == 1000 * 8
