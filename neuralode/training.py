"""Training utilities the chapters share: run profiles, device choice, seeding, and ``fit``.

``fit`` is the one training loop of the book: seeded, with a progress bar showing loss and NFE,
evaluation after every epoch, a checkpoint every epoch, and resume from it that reproduces the
uninterrupted run exactly (a Colab disconnect loses at most one epoch; ``checkpoint_dir`` puts
the checkpoints on Google Drive when it is mounted, since Colab wipes its local disk when it
recycles a runtime). The same call runs under
``torchrun`` on several processes (see :mod:`neuralode.distributed`).
"""

from __future__ import annotations

import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Union

import numpy as np
import torch
from torch import nn

from . import distributed

__all__ = ["PROFILES", "resolve_profile", "default_device", "seed_everything", "saved_tensor_bytes",
           "checkpoint_dir", "fit", "evaluate", "History"]

#: The run profiles: ``smoke`` (CI, seconds), ``cpu`` (the rendered book on a laptop, minutes),
#: ``colab`` (the ``cpu`` profile's sizes, on the GPU where a chapter uses one; chosen automatically
#: when CUDA is present, so that a free Colab GPU runs each chapter in minutes and shows the rendered
#: book's numbers), ``gpu`` (paper scale, opt-in: tens of minutes to hours per chapter).
PROFILES = ("smoke", "cpu", "colab", "gpu")


def resolve_profile(profile: str) -> str:
    """Turn a chapter's ``PROFILE`` setting into one of :data:`PROFILES`.

    ``"auto"`` gives ``"colab"`` when CUDA is available and ``"cpu"`` otherwise; the paper-scale
    ``"gpu"`` profile is never chosen for you.

    Raises:
        ValueError: for any other name, listing the valid ones.
    """
    if not isinstance(profile, str):
        raise TypeError(f"resolve_profile: profile must be a string, got {type(profile).__name__}.")
    name = profile.strip().lower()
    if name == "auto":
        return "colab" if torch.cuda.is_available() else "cpu"
    if name not in PROFILES:
        raise ValueError(f"resolve_profile: unknown profile {profile!r}; choose 'auto' or one of "
                         f"{', '.join(PROFILES)} (set it with the NEURALODE_PROFILE environment variable).")
    return name


def default_device() -> torch.device:
    """CUDA when it is available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


#: Where Colab mounts Google Drive (``drive.mount("/content/drive")``); NEURALODE_DRIVE overrides it.
DRIVE = "/content/drive/MyDrive"


def checkpoint_dir(name: str, local: Union[str, os.PathLike] = "checkpoints") -> Path:
    """The folder where a chapter keeps its checkpoints: on Google Drive when it is mounted, else local.

    Colab wipes ``/content`` when it recycles a runtime, and a checkpoint there is lost with it; one
    on Drive survives. With Drive mounted (the folder ``/content/drive/MyDrive``, or the one the
    ``NEURALODE_DRIVE`` environment variable names, exists) this is
    ``<Drive>/neuralode-checkpoints/<name>``, and checkpoints
    already written to the local folder ``<local>/<name>`` (say, before Drive was mounted) are copied
    there first, unless Drive has a file of that name: training resumes from either. Without Drive
    it is ``<local>/<name>``. The folder is created.

    Args:
        name: a folder name for the chapter or run, e.g. ``"04_odenet_classifier"``.
        local: the local folder (relative to the working directory, or absolute).

    Raises:
        ValueError: ``name`` is empty or not a single folder name.
    """
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ValueError(f"checkpoint_dir: name must be one folder name such as '04_odenet_classifier'; got {name!r}.")
    here = Path(local) / name
    drive = Path(os.environ.get("NEURALODE_DRIVE", DRIVE))
    if not drive.is_dir():
        here.mkdir(parents=True, exist_ok=True)
        return here
    there = drive / "neuralode-checkpoints" / name
    there.mkdir(parents=True, exist_ok=True)
    if here.is_dir():
        for file in sorted(here.iterdir()):
            if file.is_file() and not (there / file.name).exists():
                tmp = there / (file.name + ".partial")
                shutil.copyfile(file, tmp)
                os.replace(tmp, there / file.name)  # never leave a half-copied checkpoint behind
    return there


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and PyTorch (all devices); returns a CPU generator seeded alike."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def saved_tensor_bytes(fn: Callable[[], object], peak: bool = False) -> int:
    """Bytes of the distinct tensors autograd keeps for the backward pass while ``fn()`` runs.

    Counted with ``torch.autograd.graph.saved_tensors_hooks``. What is counted is memory, not
    save events: each saved tensor is charged the whole storage it lives in (its untyped storage,
    keyed by device, ``data_ptr`` and size), and a storage counts **once** while autograd holds
    any tensor in it. So an activation saved by two operations (a ``tanh`` output kept by the
    ``tanh`` and by the next ``linear``), or a parameter sliced and saved at every evaluation,
    counts once; a view keeps, and is charged, its whole storage. Storages that exist anyway
    (parameters, inputs) are counted when autograd saves them, so the number is the memory autograd
    keeps alive for the backward pass, not only what it allocates for it.

    Args:
        fn: the computation; include ``backward()`` in it to see what the backward pass builds
            (the checkpointed adjoint re-solves segments there).
        peak: return the most bytes held at any one moment instead of the total; a storage stops
            counting once autograd releases the last saved tensor in it.

    Returns:
        Bytes. Without ``peak``, the sum over storages each time one starts being held, so a
        storage released and saved again later (a second backward pass) counts again.
    """
    total = live = highest = 0
    holders: dict = {}  # storage key -> [saved tensors alive in it, bytes of the storage]

    def storage_of(x: torch.Tensor):
        try:
            storage = x.untyped_storage()
            return (str(x.device), storage.data_ptr(), storage.nbytes()), storage.nbytes()
        except (RuntimeError, NotImplementedError):  # no storage of its own: count the tensor
            return ("tensor", id(x)), x.numel() * x.element_size()

    class Held:  # one saved tensor; holding it keeps its storage (and address) alive
        def __init__(self, x: torch.Tensor):
            nonlocal total, live, highest
            self.x = x
            self.key, nbytes = storage_of(x)
            entry = holders.setdefault(self.key, [0, nbytes])
            entry[0] += 1
            if entry[0] == 1:
                total += nbytes
                live += nbytes
                highest = max(highest, live)

        def __del__(self):
            nonlocal live
            entry = holders[self.key]
            entry[0] -= 1
            if entry[0] == 0:
                del holders[self.key]
                live -= entry[1]

    with torch.autograd.graph.saved_tensors_hooks(Held, lambda held: held.x):
        fn()
    return highest if peak else total


@dataclass
class History:
    """What ``fit`` measured, epoch by epoch (lists of equal length) and batch by batch.

    Attributes:
        epoch_train_loss: mean training loss of each epoch.
        epoch_val_loss: validation loss after each epoch (empty without a validation loader).
        epoch_val_accuracy: validation accuracy after each epoch.
        epoch_seconds: wall time of each epoch's training.
        batch_loss: the loss of every training batch.
        batch_nfe: forward function evaluations of every batch, summed over the model's ODE
            blocks (0 for models without one); under ``torchrun`` the largest over the ranks,
            the replica every other one waits for.
        batch_backward_nfe: backward (adjoint) function evaluations of every batch (largest
            over the ranks).
        batch_rank_nfe: every rank's forward evaluations of every batch (one list per batch;
            a single entry in one process).
    """

    epoch_train_loss: List[float] = field(default_factory=list)
    epoch_val_loss: List[float] = field(default_factory=list)
    epoch_val_accuracy: List[float] = field(default_factory=list)
    epoch_seconds: List[float] = field(default_factory=list)
    batch_loss: List[float] = field(default_factory=list)
    batch_nfe: List[int] = field(default_factory=list)
    batch_backward_nfe: List[int] = field(default_factory=list)
    batch_rank_nfe: List[List[int]] = field(default_factory=list)

    @property
    def epochs(self) -> int:
        return len(self.epoch_train_loss)


def _ode_blocks(model: nn.Module) -> list:
    """The solves whose NFE ``fit`` records: ODE blocks and continuous normalizing flows."""
    from .cnf import CNF
    from .nets import ODEBlock

    return [m for m in model.modules() if isinstance(m, (ODEBlock, CNF))]


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: Optional[torch.device] = None,
             loss_fn: Callable = nn.functional.cross_entropy) -> tuple:
    """Mean loss, and accuracy for a classifier, over ``loader`` (batches of ``(x, y)``).

    ``loss_fn(prediction, y)`` is called as in training and must return the batch's mean loss, a
    scalar; the result weights each batch by its size ``len(y)``, so it is the mean over the whole
    set whatever the batch sizes (exactly so for a mean-reducing loss such as the default).
    The accuracy counts ``prediction.argmax(dim=1) == y`` for predictions ``(B, C)`` and integer
    labels ``(B,)``; for any other model (e.g. a CNF's ``(B,)`` negative log-likelihoods) it is
    ``nan``, not a made-up number. A loader without examples raises ``ValueError``.

    Under ``torchrun`` the sums are added over the ranks, so a sharded loader gives the mean over
    the whole set (and a replicated one the same mean as one process)."""
    model = distributed.unwrap_model(model)
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0.0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        prediction = model(x)
        loss = loss_fn(prediction, y)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"evaluate: loss_fn must return a scalar (the batch's mean loss), got {shape}; "
                             "reduce it, e.g. with .mean().")
        total_loss += loss.item() * len(y)
        classifier = prediction.dim() == 2 and y.shape == prediction.shape[:1] and not y.is_floating_point()
        correct += (prediction.argmax(dim=1) == y).sum().item() if classifier else math.nan
        count += len(y)
    model.train(was_training)
    total_loss, correct, count = distributed.all_reduce_sum([total_loss, correct, count], device)
    if count == 0:  # else a loss and an accuracy of 0.0 would be reported for nothing
        raise ValueError("evaluate: the loader yielded no examples; a generator or iterator is used up after "
                         "one pass: pass a list, a DataLoader, or an object whose __iter__ starts over.")
    return total_loss / count, correct / count


def _gather_batch(loss: float, count: int, nfe: int, backward_nfe: int, device) -> list:
    """Every rank's ``(loss, count, nfe, backward_nfe)`` of this batch, in rank order."""
    mine = torch.tensor([loss, count, nfe, backward_nfe], dtype=torch.float64, device=device)
    gathered = [torch.zeros_like(mine) for _ in range(distributed.world_size())]
    torch.distributed.all_gather(gathered, mine)
    return [g.tolist() for g in gathered]


def _own_rng_state(saved: dict) -> dict:
    """This rank's generator states from a checkpoint (written by one or by several ranks)."""
    if "per_rank" not in saved:
        return saved
    states = saved["per_rank"]
    return states[distributed.rank()] if len(states) == distributed.world_size() else states[0]


def _rng_state(loader) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    generator = getattr(getattr(loader, "sampler", None), "generator", None)
    if generator is not None:
        state["sampler"] = generator.get_state()
    return state


def _set_rng_state(state: dict, loader) -> None:
    # Every torch generator state is a CPU ByteTensor, whatever the generator's device: .cpu()
    # keeps a state that was loaded onto the GPU acceptable.
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    generator = getattr(getattr(loader, "sampler", None), "generator", None)
    if generator is not None and "sampler" in state:
        generator.set_state(state["sampler"].cpu())


def _batches_per_epoch(loader, max_batches: Optional[int]) -> Optional[int]:
    """The progress bar's batches per epoch; ``None`` when the loader has no length (a generator)."""
    try:
        n = len(loader)
    except TypeError:  # no __len__, or an IterableDataset's DataLoader
        return max_batches
    return n if max_batches is None else min(n, max_batches)


def fit(
    model: nn.Module,
    train_loader: Iterable,
    *,
    epochs: int,
    optimizer: torch.optim.Optimizer,
    scheduler=None,
    val_loader: Optional[Iterable] = None,
    loss_fn: Callable = nn.functional.cross_entropy,
    device: Optional[Union[str, torch.device]] = None,
    checkpoint: Optional[Union[str, os.PathLike]] = None,
    seed: int = 0,
    max_batches: Optional[int] = None,
    progress: bool = True,
    stop_after_epochs: Optional[int] = None,
) -> History:
    """Train ``model`` for ``epochs`` epochs; resume from ``checkpoint`` if it exists.

    Args:
        model: maps a batch ``x`` to predictions; ODE blocks inside report their NFE.
        train_loader: iterable of ``(x, y)`` batches (a ``DataLoader``; give it a seeded
            ``generator`` when it shuffles, so that a resumed run sees the same batches). It is
            iterated once per epoch, so it must start over each time (a list or a ``DataLoader``;
            a generator serves one epoch only). An epoch without batches raises.
        epochs: total number of epochs (a resumed run continues up to it).
        optimizer, scheduler: the optimizer, and optionally a scheduler stepped once per epoch.
        val_loader: evaluated after every epoch by :func:`evaluate`: ``loss_fn`` called as in
            training, averaged over the validation set weighting each batch by ``len(y)``, and
            the accuracy (``nan`` when the model is not a classifier).
        loss_fn: ``loss_fn(prediction, y)``, returning the batch's mean loss (a scalar);
            cross-entropy by default. A CNF wrapped to return ``-log p(x)``, ``(B,)``, trains
            with ``lambda nll, _: nll.mean()``.
        device: defaults to :func:`default_device`; the model is moved there.
        checkpoint: a file path; written after every epoch (model, optimizer, scheduler, history
            and every random generator's state) and read at the start when it exists.
        seed: seeds Python, NumPy and PyTorch at a fresh start.
        max_batches: stop each epoch after this many batches (the ``smoke`` profile); a positive
            integer.
        progress: show a progress bar (tqdm) with the loss and the NFE; without a total when
            ``train_loader`` has no length.
        stop_after_epochs: leave after this many epochs of this call (simulates an interruption).

    Returns:
        The :class:`History` of all epochs so far, including those before a resume.

    Under ``torchrun`` (a process group initialised, e.g. by
    :func:`neuralode.distributed.init_from_environment`) the same call trains data-parallel: the
    model is wrapped in DistributedDataParallel, a ``DistributedSampler`` (see
    :func:`neuralode.distributed.shard_loader`) is reshuffled every epoch, losses are averaged and
    NFE gathered over the ranks, rank 0 alone shows progress and writes the checkpoint (with every
    rank's generator states), and every rank resumes from it.
    """
    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"fit: epochs must be a non-negative integer, got {epochs!r}.")
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 1):
        raise ValueError(f"fit: max_batches must be a positive integer or None, got {max_batches!r}.")
    device = torch.device(device) if device is not None else default_device()
    model = distributed.unwrap_model(model).to(device)
    history, start = History(), 0
    path = Path(checkpoint) if checkpoint is not None else None
    if path is not None and path.exists():
        # Onto the CPU: the RNG states must stay CPU ByteTensors, and load_state_dict copies the
        # model's and the optimizer's tensors to their parameters' device anyway.
        state = torch.load(path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        history = History(**state["history"])
        start = history.epochs
        _set_rng_state(_own_rng_state(state["rng"]), train_loader)
    else:
        seed_everything(seed + distributed.rank())  # independent noise per rank (e.g. Hutchinson probes)
    # Under torchrun: DistributedDataParallel averages the gradients in backward (it broadcasts
    # rank 0's parameters when it wraps, so every replica starts equal).
    replica = distributed.wrap_model(model, device)

    blocks = _ode_blocks(model)
    bar = None
    if progress and distributed.is_main_process():
        from tqdm.auto import tqdm

        per_epoch = _batches_per_epoch(train_loader, max_batches)
        bar = tqdm(total=None if per_epoch is None else (epochs - start) * per_epoch, desc="fit", leave=False)
    sampler = getattr(train_loader, "sampler", None)
    done = 0
    for epoch in range(start, epochs):
        if stop_after_epochs is not None and done >= stop_after_epochs:
            break
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)  # a DistributedSampler reshuffles per epoch, alike on every rank
        replica.train()
        began, total, seen = time.perf_counter(), 0.0, 0
        for i, (x, y) in enumerate(train_loader):
            if max_batches is not None and i >= max_batches:
                break
            x, y = x.to(device), y.to(device)
            loss = loss_fn(replica(x), y)
            nfe = sum(b.nfe for b in blocks)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            value, count, backward_nfe = loss.item(), len(y), sum(getattr(b, "backward_nfe", 0) for b in blocks)
            if distributed.is_distributed():  # one small collective per batch: the ranks' numbers
                ranks = _gather_batch(value, count, nfe, backward_nfe, device)
                value = sum(r[0] * r[1] for r in ranks) / max(sum(r[1] for r in ranks), 1)
                count = sum(int(r[1]) for r in ranks)
                rank_nfe = [int(r[2]) for r in ranks]
                nfe, backward_nfe = max(rank_nfe), max(int(r[3]) for r in ranks)
            else:
                rank_nfe = [nfe]
            history.batch_loss.append(value)
            history.batch_nfe.append(nfe)
            history.batch_backward_nfe.append(backward_nfe)
            history.batch_rank_nfe.append(rank_nfe)
            total += value * count
            seen += count
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{value:.3f}", nfe=nfe)
        if seen == 0:  # else the epoch would record a loss of 0.0 without having trained
            raise ValueError(f"fit: train_loader yielded no batches in epoch {epoch + 1}; a generator or iterator "
                             "is used up after one epoch: pass a list, a DataLoader, or an object whose "
                             "__iter__ starts over.")
        if scheduler is not None:
            scheduler.step()
        history.epoch_train_loss.append(total / seen)
        history.epoch_seconds.append(time.perf_counter() - began)
        if val_loader is not None:
            val_loss, val_acc = evaluate(model, val_loader, device, loss_fn)
            history.epoch_val_loss.append(val_loss)
            history.epoch_val_accuracy.append(val_acc)
        if path is not None:
            rng = _rng_state(train_loader)
            if distributed.is_distributed():
                ranks_rng = [None] * distributed.world_size()
                torch.distributed.all_gather_object(ranks_rng, rng)
                rng = {"per_rank": ranks_rng}
            if distributed.is_main_process():  # one writer; the others wait for the file
                path.parent.mkdir(parents=True, exist_ok=True)
                state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": None if scheduler is None else scheduler.state_dict(),
                         "history": asdict(history), "rng": rng}
                tmp = path.with_name(path.name + ".tmp")
                torch.save(state, tmp)
                os.replace(tmp, path)  # never leave a half-written checkpoint behind
            distributed.barrier()
        done += 1
    if bar is not None:
        bar.close()
    return history
