"""What one training step of chapter 4's models costs: operator calls, FLOPs, and CPU time.

The basis of the `colab` profile's run-time estimate for chapter 4 (stated in the chapter's header
until a GPU has measured it). In eager PyTorch every operator call is at least one kernel launch,
and on a GPU each costs some microseconds of host time however small its tensors; a step's GPU time
is then about ``max(calls x launch cost, FLOPs / throughput)``. At the `cpu` profile's sizes (batch
32, 16 channels, 28x28 MNIST) the ODE-Net's step is a few thousand calls and about a GFLOP and a
half, so a T4 (8 TFLOPS single precision at its peak) would spend it on launches: tens of
milliseconds, about what this machine's CPU core takes. Counted here on the CPU with a
``TorchDispatchMode`` (every ATen call, forward, backward and optimizer) and PyTorch's FLOP formulas
(``torch.utils.flop_counter.flop_registry``: convolutions and matrix products).

    python benchmarks/launch_bound.py [--channels 16] [--batch 32] [--launch-us 15] [--tflops 2]

Prints one line per model: calls, GFLOP, CPU seconds per step (one thread; median of 5), and the
estimate ``max(calls x launch, FLOPs / throughput)`` for the given launch cost and sustained
throughput (defaults: 15 us per call, 2 TFLOPS; both assumptions, stated in the output).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import flop_registry

import neuralode as node


class CountCalls(TorchDispatchMode):
    """Counts ATen operator calls and their FLOPs (where PyTorch has a formula) while active."""

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.calls += 1
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            shape = lambda a: a.shape if isinstance(a, torch.Tensor) else a  # noqa: E731
            self.flops += formula(*tree_map(shape, args), **tree_map(shape, kwargs), out_val=tree_map(shape, out))
        return out


def step(model, optimizer, x, y):
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--launch-us", type=float, default=15.0, help="assumed host cost of one GPU operator call")
    parser.add_argument("--tflops", type=float, default=2.0, help="assumed sustained GPU throughput for these sizes")
    args = parser.parse_args()
    torch.set_num_threads(1)
    x = torch.randn(args.batch, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (args.batch,), generator=torch.Generator().manual_seed(1))
    print(f"batch {args.batch}, {args.channels} channels, 28x28; estimate = max(calls x {args.launch_us:g} us, "
          f"FLOPs / {args.tflops:g} TFLOPS) (assumptions, not measurements)")
    for kind in ("mlp", "resnet", "tied-resnet", "rknet", "odenet"):
        torch.manual_seed(0)
        model = node.make_classifier(kind, in_channels=1, image_size=28, channels=args.channels, num_classes=10,
                                     rtol=1e-3, atol=1e-3, adjoint=(kind == "odenet"))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for _ in range(20):  # a few steps first, so that the ODE-Net's solver is past its first, cheaper steps
            step(model, optimizer, x, y)
        counter = CountCalls()
        with counter:
            step(model, optimizer, x, y)
        seconds = []
        for _ in range(5):
            began = time.perf_counter()
            step(model, optimizer, x, y)
            seconds.append(time.perf_counter() - began)
        estimate = max(counter.calls * args.launch_us * 1e-6, counter.flops / (args.tflops * 1e12))
        print(f"{kind:12s} {counter.calls:6d} calls  {counter.flops / 1e9:6.3f} GFLOP  "
              f"cpu {statistics.median(seconds) * 1e3:6.1f} ms/step  gpu estimate {estimate * 1e3:6.1f} ms/step")


if __name__ == "__main__":
    main()
