import pytest
import torch
from torch.utils.data import TensorDataset

import neuralode as node
from neuralode import data


def test_mnist_unavailable_falls_back_to_digits_and_says_so(monkeypatch, capsys):
    def no_network(root, augment, timeout):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nName or service not known")

    monkeypatch.setattr(data, "_mnist", no_network)
    images = data.image_classification("mnist", train_subset=200)
    printed = capsys.readouterr().out
    assert images.name == "digits" and images.image_size == 8
    assert "MNIST could not be loaded" in printed and "Name or service not known" in printed
    assert "8x8 handwritten digits" in images.note and images.n_train == 200


def test_digits_split_shapes_and_normalisation():
    images = data.image_classification("digits", verbose=False)
    assert images.n_train + images.n_test == 1797 and images.n_test == 359
    x, y = next(iter(images.test))
    assert x.shape == (359, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.long
    all_x = torch.cat([b[0] for b in images.train] + [x])
    assert abs(all_x.mean().item()) < 0.05 and abs(all_x.std().item() - 1) < 0.05
    assert set(y.tolist()) == set(range(10))


def test_split_and_shuffling_are_seeded():
    a = data.image_classification("digits", verbose=False, seed=3)
    b = data.image_classification("digits", verbose=False, seed=3)
    c = data.image_classification("digits", verbose=False, seed=4)
    first = lambda d: next(iter(d.train))[1]  # noqa: E731
    assert torch.equal(first(a), first(b)) and not torch.equal(first(a), first(c))
    assert torch.equal(next(iter(a.test))[0], next(iter(b.test))[0])


def test_the_mnist_branch_has_the_same_interface(monkeypatch):
    fake = TensorDataset(torch.randn(300, 1, 28, 28), torch.randint(0, 10, (300,)))
    seen = {}

    def fake_mnist(root, augment, timeout):
        seen.update(augment=augment, timeout=timeout)
        return fake, fake

    monkeypatch.setattr(data, "_mnist", fake_mnist)
    images = data.image_classification("mnist", augment=True, train_subset=100, test_subset=50, verbose=False)
    assert images.name == "mnist" and images.image_size == 28 and (images.n_train, images.n_test) == (100, 50)
    assert seen == {"augment": True, "timeout": 30.0}
    model = node.make_classifier("odenet", image_size=images.image_size, channels=8)
    assert model(next(iter(images.train))[0][:2]).shape == (2, 10)


def test_unknown_image_data_set():
    with pytest.raises(ValueError, match="unknown data set 'cifar'"):
        data.image_classification("cifar")
