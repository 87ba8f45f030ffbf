"""Train one of the paper's image classifiers from the command line, on one device or several.

::

    python -m neuralode.train odenet --profile cpu
    torchrun --nproc_per_node=4 -m neuralode.train odenet --profile gpu --adjoint --checkpoint odenet.pt

The models are chapter 4's (:func:`neuralode.make_classifier`: ``mlp``, ``resnet``, ``rknet``,
``odenet``), trained with its recipe (SGD with momentum 0.9, learning rate 0.1 divided by 10 at
the fractions 60/160, 100/160 and 140/160 of the epochs, solver tolerance 1e-3) by
:func:`neuralode.fit`. Under ``torchrun`` each rank trains on its shard of every batch
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

from . import data as datasets
from . import distributed
from .nets import count_parameters, make_classifier
from .training import default_device, evaluate, fit, resolve_profile

__all__ = ["PROFILE_SETTINGS", "main"]

#: What each profile trains: data set, width, epochs, per-rank batch size, subsets (smoke only).
PROFILE_SETTINGS = {
    "smoke": dict(data="digits", channels=8, epochs=2, batch_size=32, train_subset=256, test_subset=128),
    "cpu": dict(data="digits", channels=32, epochs=30, batch_size=128, train_subset=None, test_subset=None),
    "gpu": dict(data="mnist", channels=64, epochs=20, batch_size=128, train_subset=None, test_subset=None),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m neuralode.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=["mlp", "resnet", "rknet", "odenet"])
    parser.add_argument("--profile", default="auto", help="smoke, cpu, gpu or auto (gpu when CUDA is present)")
    parser.add_argument("--epochs", type=int, help="override the profile's number of epochs")
    parser.add_argument("--batch-size", type=int, help="per rank; the global batch is this times the ranks")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--tol", type=float, default=1e-3, help="rtol = atol of the ODE-Net's dopri5")
    parser.add_argument("--adjoint", action="store_true", help="ODE-Net gradients by the adjoint method")
    parser.add_argument("--checkpoint", help="resume from and write to this file (rank 0 writes)")
    parser.add_argument("--out", help="write a JSON summary here (rank 0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    parser.add_argument("--progress", action="store_true", help="show a progress bar (rank 0)")
    return parser


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
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
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
    if distributed.is_main_process():
        print(f"{args.model} ({summary['parameters']:,} parameters) on {images.name}, {summary['ranks']} rank(s): "
              f"test accuracy {test_accuracy:.4f} after {history.epochs} epochs, {seconds:.1f} s")
        if args.out:
            with open(args.out, "w", encoding="utf-8") as f:
                json.dump(summary, f, indent=1)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
