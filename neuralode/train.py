"""Train one of the paper's image classifiers from the command line, on one device or several.

::

    python -m neuralode.train odenet --profile cpu
    torchrun --nproc_per_node=4 -m neuralode.train odenet --profile gpu --adjoint --checkpoint odenet.pt
    torchrun --nproc_per_node=4 -m neuralode.train cnf --data checkerboard --profile gpu

The classifiers are chapter 4's (:func:`neuralode.make_classifier`: ``mlp``, ``resnet``, ``rknet``,
``odenet``), trained with its recipe (SGD with momentum 0.9, learning rate 0.1 divided by 10 at
the fractions 60/160, 100/160 and 140/160 of the epochs, solver tolerance 1e-3) by
:func:`neuralode.fit`. ``cnf`` is the FFJORD density model of chapters 5 and 6 on a 2-D toy data
set (:class:`neuralode.CNF` with :class:`neuralode.CNFDynamics` and Hutchinson's estimator),
trained by maximum likelihood with Adam. Under ``torchrun`` each rank trains on its shard of every batch
(``--batch-size`` is per rank), rank 0 prints and writes the checkpoint and the ``--out`` summary,
and the summary records every rank's function evaluations per batch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Optional, Sequence

import torch

from torch import nn
from torch.utils.data import TensorDataset

from . import data as datasets
from . import distributed
from .cnf import CNF, CNFDynamics
from .nets import count_parameters, make_classifier
from .training import default_device, evaluate, fit, resolve_profile

__all__ = ["PROFILE_SETTINGS", "CNF_SETTINGS", "NegativeLogLikelihood", "main"]

#: What each profile trains: data set, width, epochs, per-rank batch size, subsets (smoke only).
PROFILE_SETTINGS = {
    "smoke": dict(data="digits", channels=8, epochs=2, batch_size=32, train_subset=256, test_subset=128),
    "cpu": dict(data="digits", channels=32, epochs=30, batch_size=128, train_subset=None, test_subset=None),
    "gpu": dict(data="mnist", channels=64, epochs=20, batch_size=128, train_subset=None, test_subset=None),
}
PROFILE_SETTINGS["colab"] = PROFILE_SETTINGS["cpu"]  # the cpu profile's sizes, on a GPU


#: The ``cnf`` model's profiles: training samples, epochs, per-rank batch, hidden widths.
CNF_SETTINGS = {
    "smoke": dict(n_train=1024, n_test=512, epochs=1, batch_size=128, hidden=(32, 32, 32)),
    "cpu": dict(n_train=20_000, n_test=5_000, epochs=3, batch_size=256, hidden=(64, 64, 64)),
    "gpu": dict(n_train=200_000, n_test=20_000, epochs=20, batch_size=1024, hidden=(64, 64, 64)),
}
CNF_SETTINGS["colab"] = CNF_SETTINGS["cpu"]


class NegativeLogLikelihood(nn.Module):
    """Wraps a :class:`neuralode.CNF` so that ``forward(x)`` is ``-log p(x)`` per example, ``(B,)``:
    the shape :func:`neuralode.fit` trains with ``loss_fn=lambda nll, _: nll.mean()``."""

    def __init__(self, cnf: CNF):
        super().__init__()
        self.cnf = cnf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -self.cnf.log_prob(x)


def _mean_nll(model: nn.Module, x: torch.Tensor, device, batch: int = 2048) -> float:
    """Mean ``-log p`` of ``x`` (this rank's share, summed over the ranks)."""
    model = distributed.unwrap_model(model)
    total = 0.0
    with torch.no_grad():
        for chunk in x.split(batch):
            total += model(chunk.to(device)).sum().item()
    total, count = distributed.all_reduce_sum([total, len(x)], device)
    return total / count


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m neuralode.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=["mlp", "resnet", "rknet", "odenet", "cnf"])
    parser.add_argument("--data", default=None, help="cnf only: one of neuralode.data.TOY_DENSITIES (8gaussians)")
    parser.add_argument("--profile", default="auto", help="smoke, cpu, colab, gpu or auto (colab when CUDA is present, else cpu)")
    parser.add_argument("--epochs", type=int, help="override the profile's number of epochs")
    parser.add_argument("--batch-size", type=int, help="per rank; the global batch is this times the ranks")
    parser.add_argument("--lr", type=float, default=None, help="0.1 (SGD) for classifiers, 1e-3 (Adam) for cnf")
    parser.add_argument("--tol", type=float, default=1e-3, help="rtol = atol of the ODE-Net's dopri5")
    parser.add_argument("--adjoint", action="store_true", help="ODE-Net gradients by the adjoint method")
    parser.add_argument("--checkpoint", help="resume from and write to this file (rank 0 writes)")
    parser.add_argument("--out", help="write a JSON summary here (rank 0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    parser.add_argument("--progress", action="store_true", help="show a progress bar (rank 0)")
    return parser


def _train_classifier(args, settings: dict, profile: str, device: torch.device) -> dict:
    images = datasets.image_classification(settings["data"], batch_size=settings["batch_size"],
                                           train_subset=settings["train_subset"],
                                           test_subset=settings["test_subset"], seed=args.seed,
                                           verbose=distributed.is_main_process())
    train = distributed.shard_loader(images.train.dataset, settings["batch_size"], seed=args.seed)
    test = distributed.shard_loader(images.test.dataset, 1000, shuffle=False, drop_last=False)
    torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = make_classifier(args.model, in_channels=images.in_channels, image_size=images.image_size,
                            channels=settings["channels"], num_classes=images.num_classes, rtol=args.tol,
                            atol=args.tol, adjoint=args.adjoint)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr or 0.1, momentum=0.9, weight_decay=5e-4)
    epochs = settings["epochs"]
    milestones = sorted({max(1, round(epochs * f)) for f in (60 / 160, 100 / 160, 140 / 160)})
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)

    began = time.perf_counter()
    history = fit(model, train, epochs=epochs, optimizer=optimizer, scheduler=scheduler, device=device,
                  checkpoint=args.checkpoint, seed=args.seed, progress=args.progress)
    seconds = time.perf_counter() - began
    test_loss, test_accuracy = evaluate(model, test, device)
    summary = {
        "model": args.model, "profile": profile, "data": images.name, "ranks": distributed.world_size(),
        "device": str(device), "parameters": count_parameters(model), "epochs": history.epochs,
        "global_batch": settings["batch_size"] * distributed.world_size(), "adjoint": args.adjoint,
        "test_loss": test_loss, "test_accuracy": test_accuracy, "train_seconds": seconds,
        "epoch_seconds": history.epoch_seconds, "epoch_train_loss": history.epoch_train_loss,
        "batch_rank_nfe": history.batch_rank_nfe, "batch_backward_nfe": history.batch_backward_nfe,
    }
    return summary


def _train_cnf(args, profile: str, device: torch.device) -> dict:
    settings = dict(CNF_SETTINGS[profile])
    if args.epochs is not None:
        settings["epochs"] = args.epochs
    if args.batch_size is not None:
        settings["batch_size"] = args.batch_size
    name = args.data or "8gaussians"
    x = datasets.toy_density(name, settings["n_train"] + settings["n_test"], seed=args.seed)
    train_x, test_x = x[:settings["n_train"]], x[settings["n_train"]:]
    # Every rank evaluates its own slice of the test set; the sums are added over the ranks.
    test_x = test_x[distributed.rank()::distributed.world_size()]
    train = distributed.shard_loader(TensorDataset(train_x, torch.zeros(len(train_x))), settings["batch_size"],
                                     seed=args.seed)
    torch.manual_seed(args.seed)
    model = NegativeLogLikelihood(CNF(CNFDynamics(2, hidden=settings["hidden"]), trace="hutchinson",
                                      rtol=args.tol, atol=args.tol, adjoint=args.adjoint))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr or 1e-3)
    began = time.perf_counter()
    history = fit(model, train, epochs=settings["epochs"], optimizer=optimizer, device=device,
                  loss_fn=lambda nll, _: nll.mean(), checkpoint=args.checkpoint, seed=args.seed,
                  progress=args.progress)
    seconds = time.perf_counter() - began
    return {
        "model": "cnf", "profile": profile, "data": name, "ranks": distributed.world_size(), "device": str(device),
        "parameters": count_parameters(model), "epochs": history.epochs,
        "global_batch": settings["batch_size"] * distributed.world_size(), "adjoint": args.adjoint,
        "test_nll": _mean_nll(model, test_x, device), "train_seconds": seconds,
        "epoch_seconds": history.epoch_seconds, "epoch_train_loss": history.epoch_train_loss,
        "batch_rank_nfe": history.batch_rank_nfe, "batch_backward_nfe": history.batch_backward_nfe,
    }


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Parse ``argv``, train, evaluate, and return (and optionally write) the summary."""
    args = _parser().parse_args(argv)
    profile = resolve_profile(args.profile)
    settings = dict(PROFILE_SETTINGS[profile])
    if args.epochs is not None:
        settings["epochs"] = args.epochs
    if args.batch_size is not None:
        settings["batch_size"] = args.batch_size
    torch.set_num_threads(args.threads)
    distributed.init_from_environment()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else default_device()

    if args.model == "cnf":
        summary = _train_cnf(args, profile, device)
    else:
        summary = _train_classifier(args, settings, profile, device)
    if distributed.is_main_process():
        result = (f"test accuracy {summary['test_accuracy']:.4f}" if "test_accuracy" in summary
                  else f"test negative log-likelihood {summary['test_nll']:.4f} nats")
        print(f"{args.model} ({summary['parameters']:,} parameters) on {summary['data']}, {summary['ranks']} rank(s): "
              f"{result} after {summary['epochs']} epochs, {summary['train_seconds']:.1f} s")
        if args.out:
            with open(args.out, "w", encoding="utf-8") as f:
                json.dump(summary, f, indent=1)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
