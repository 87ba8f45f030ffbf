"""`fit` under torch.distributed: two CPU processes (gloo) against one process on the union of batches.

DistributedDataParallel averages the ranks' gradients, so two ranks with shards of size b must
train exactly like one process with the union batch of size 2b, provided each solve does the same
arithmetic. A fixed-step solver does; an adaptive one chooses its steps from the error of its own
shard, so there the agreement is to the solver's tolerance, which is the point the appendix makes.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, TensorDataset

import neuralode as node

WORLD, PER_RANK, EPOCHS, SEED = 2, 8, 2, 3
SOLVERS = {"rk4": dict(method="rk4", options={"step_size": 0.25}), "dopri5": dict(method="dopri5", rtol=1e-10, atol=1e-10)}


def _dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, generator=g, dtype=torch.float64)
    return TensorDataset(x, (x[:, 0] * x[:, 1] > 0).long())


def _model(solver: str, adjoint: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    block = node.ODEBlock(node.MLPDynamics(2, hidden=8), adjoint=adjoint, **SOLVERS[solver])
    return torch.nn.Sequential(block, torch.nn.Linear(2, 2)).double()


def _optimizer(model):
    return torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)


def _worker(rank: int, store: str, solver: str, adjoint: bool, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        model = _model(solver, adjoint)
        loader = node.distributed.shard_loader(_dataset(), PER_RANK, seed=SEED)
        history = node.fit(model, loader, epochs=EPOCHS, optimizer=_optimizer(model), device="cpu",
                           val_loader=loader, checkpoint=os.path.join(out, "ckpt.pt"), progress=False)
        torch.save({"params": [p.detach() for p in model.parameters()], "history": history,
                    "world": node.distributed.world_size()}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _single_process(solver: str, adjoint: bool):
    """One process, batches = the union of the ranks' shards (DistributedSampler's permutation)."""
    model = _model(solver, adjoint)
    optimizer = _optimizer(model)
    data = _dataset()
    node.seed_everything(0)
    losses = []
    for epoch in range(EPOCHS):
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(SEED + epoch)).tolist()
        for x, y in DataLoader(data, batch_size=WORLD * PER_RANK, sampler=order):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return [p.detach() for p in model.parameters()], losses


# Each case spawns two processes (most of its cost). Every factor is covered once: fixed steps, where
# the ranks must equal one process exactly, through the adjoint's custom backward (the riskier path
# under DDP's gradient hooks); adaptive steps, equal to the solver's tolerance, through backprop.
@pytest.mark.parametrize("solver, adjoint", [("rk4", True), ("dopri5", False)], ids=["rk4-adjoint", "dopri5-backprop"])
def test_two_ranks_train_like_one_process_on_the_union_of_batches(tmp_path, solver, adjoint):
    mp.spawn(_worker, args=(str(tmp_path / "store"), solver, adjoint, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    assert all(r["world"] == WORLD for r in ranks)
    reference, losses = _single_process(solver, adjoint)
    # The replicas never diverge: DDP gives every rank the same averaged gradient.
    for a, b in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(a, b)
    tol = 1e-12 if solver == "rk4" else 1e-7  # adaptive: each shard picks its own steps
    start = _model(solver, adjoint)
    for p, q, p0 in zip(ranks[0]["params"], reference, start.parameters()):
        assert not torch.allclose(p, p0), "training did not move the parameters"
        assert torch.allclose(p, q, rtol=0, atol=tol), (p - q).abs().max()
    history = ranks[0]["history"]
    assert len(history.batch_loss) == len(losses) == EPOCHS * 64 // (WORLD * PER_RANK)
    # The loss fit records is the global batch mean, equal to the single process's.
    assert max(abs(a - b) for a, b in zip(history.batch_loss, losses)) < (1e-12 if solver == "rk4" else 1e-7)
    assert all(len(r) == WORLD for r in history.batch_rank_nfe)
    assert history.batch_nfe == [max(r) for r in history.batch_rank_nfe]
    if solver == "rk4":  # fixed steps: the same work on every rank
        assert all(len(set(r)) == 1 for r in history.batch_rank_nfe)
    assert len(history.epoch_val_accuracy) == EPOCHS and 0 <= history.epoch_val_accuracy[-1] <= 1
    assert (tmp_path / "ckpt.pt").exists()


def test_checkpoint_written_under_torchrun_resumes_in_one_process(tmp_path):
    """A checkpoint from two ranks holds the bare model's state and every rank's generators."""
    mp.spawn(_worker, args=(str(tmp_path / "store"), "rk4", False, str(tmp_path)), nprocs=WORLD, join=True)
    state = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert not any(k.startswith("module.") for k in state["model"])  # loads without a DDP wrapper
    assert len(state["rng"]["per_rank"]) == WORLD
    model = _model("rk4", False)
    model.load_state_dict(state["model"])
    loader = node.distributed.shard_loader(_dataset(), PER_RANK * WORLD, seed=SEED)
    history = node.fit(model, loader, epochs=EPOCHS + 1, optimizer=_optimizer(model), device="cpu",
                       checkpoint=tmp_path / "ckpt.pt", progress=False)
    assert history.epochs == EPOCHS + 1 and math.isfinite(history.epoch_train_loss[-1])


def test_helpers_are_no_ops_in_one_process():
    assert node.distributed.world_size() == 1 and node.distributed.rank() == 0
    assert node.distributed.is_main_process() and not node.distributed.is_distributed()
    model = torch.nn.Linear(2, 2)
    assert node.distributed.wrap_model(model, torch.device("cpu")) is model
    assert node.distributed.all_reduce_sum([1.0, 2.0], torch.device("cpu")) == [1.0, 2.0]
    assert node.distributed.all_gather_ints(5, torch.device("cpu")) == [5]
    assert not node.distributed.init_from_environment()  # no torchrun environment here


def test_train_command_in_one_process(tmp_path):
    """`python -m neuralode.train odenet --profile smoke`, as the README has a reader type it."""
    import json
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "neuralode.train", "odenet", "--profile", "smoke", "--epochs", "1",
                             "--out", "s.json"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["ranks"] == 1 and summary["epochs"] == 1 and 0 <= summary["test_accuracy"] <= 1
    assert all(len(r) == 1 for r in summary["batch_rank_nfe"]) and summary["batch_rank_nfe"][0][0] > 0
    assert "test accuracy" in result.stdout


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_train_command_under_torchrun(tmp_path):
    """`torchrun --nproc_per_node=2 -m neuralode.train odenet ...`: the README's command with the
    `torchrun` that torch installs (a free port on 127.0.0.1, so parallel test runs cannot collide)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "summary.json"
    result = subprocess.run(
        [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node=2", "--master-addr=127.0.0.1",
         f"--master-port={_free_port()}", "-m", "neuralode.train", "odenet", "--profile", "smoke",
         "--epochs", "1", "--batch-size", "16", "--adjoint", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = json.loads(out.read_text())
    assert summary["ranks"] == 2 and summary["global_batch"] == 32 and summary["adjoint"]
    assert all(len(r) == 2 for r in summary["batch_rank_nfe"])
    assert result.stdout.count("test accuracy") == 1  # rank 0 prints, the other rank does not


def test_train_command_fits_a_cnf(tmp_path):
    from neuralode import train

    summary = train.main(["cnf", "--data", "8gaussians", "--profile", "smoke", "--epochs", "2"])
    assert summary["model"] == "cnf" and summary["epochs"] == 2 and summary["ranks"] == 1
    assert all(r[0] > 0 for r in summary["batch_rank_nfe"])  # fit records the CNF's NFE
    assert summary["epoch_train_loss"][-1] < summary["epoch_train_loss"][0]
    assert 0 < summary["test_nll"] < 20
