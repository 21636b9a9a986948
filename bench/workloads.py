"""The benchmark workloads: a model, a batch size and a reduced twin for the value checks.

Data is random (inputs ~ N(0, 1), labels uniform over the 10 classes): the benchmark
measures cost, and cost does not depend on the data. Every value check runs in float64 on
the reduced twin: the same layer sequence with fewer channels, smaller images or a smaller
batch, so that the dense reference quantities of every implementation fit in memory.
"""
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "examples" / "models"


def load_model_file(path):
    """(model, example_input, loss_fn) from a model.py that follows hbpc's contract."""
    spec = importlib.util.spec_from_file_location(f"bench_model_{Path(path).stem}", path)
    source = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(source)
    model = source.build_model() if hasattr(source, "build_model") else source.model
    return model, source.example_input, getattr(source, "loss_fn", nn.CrossEntropyLoss())


def _c4d3_small():
    """c4d3's layer sequence on 8×8 images with 4/6 channels and 16/12 hidden units."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.Sigmoid(),
        nn.Conv2d(4, 4, 3, padding=1), nn.Sigmoid(),
        nn.MaxPool2d(2, stride=2),
        nn.Conv2d(4, 6, 3, padding=1), nn.Sigmoid(),
        nn.Conv2d(6, 6, 3, padding=1), nn.Sigmoid(),
        nn.MaxPool2d(2, stride=2),
        nn.Flatten(),
        nn.Linear(24, 16), nn.Sigmoid(),
        nn.Linear(16, 12), nn.Sigmoid(),
        nn.Linear(12, 10),
    )
    return model, torch.zeros(2, 3, 8, 8), nn.CrossEntropyLoss()


def _3c3d_small():
    """3c3d's layer sequence (convs, sigmoids, TF-"same" zero pads, 3/2 max-pools) on 16×16 images."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 5), nn.Sigmoid(), nn.ZeroPad2d((0, 1, 0, 1)), nn.MaxPool2d(3, stride=2),
        nn.Conv2d(4, 6, 3), nn.Sigmoid(), nn.ZeroPad2d((0, 1, 0, 1)), nn.MaxPool2d(3, stride=2),
        nn.ZeroPad2d((1, 1, 1, 1)), nn.Conv2d(6, 8, 3), nn.Sigmoid(), nn.ZeroPad2d((0, 1, 0, 1)),
        nn.MaxPool2d(3, stride=2),
        nn.Flatten(),
        nn.Linear(8, 16), nn.Sigmoid(),
        nn.Linear(16, 12), nn.Sigmoid(),
        nn.Linear(12, 10),
    )
    return model, torch.zeros(2, 3, 16, 16), nn.CrossEntropyLoss()


def _tiny():
    """A two-layer sigmoid MLP on 6×6 single-channel inputs: the workload of tests/test_bench.py."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 12), nn.Sigmoid(), nn.Linear(12, 10))
    return model, torch.zeros(2, 1, 6, 6), nn.CrossEntropyLoss()


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    batch: int
    build: Callable  # () -> (model, example_input, loss_fn), float32
    check_batch: int = 8
    check_build: Optional[Callable] = None  # the reduced twin; None: the same model
    note: str = ""

    def build_check(self):
        return (self.check_build or self.build)()


def _from_file(name):
    return lambda: load_model_file(MODELS / f"{name}.py")


WORKLOADS = {
    "fcnn": Workload("fcnn", "CIFAR-10 FCNN (Chen et al., 3.8 M params)", 128, _from_file("fcnn_cifar10"),
                     note="checks: the same FCNN, N = 8"),
    "c4d3": Workload("c4d3", "CIFAR-10 c4d3 (1.1 M params)", 64, _from_file("c4d3_cifar10"),
                     check_batch=4, check_build=_c4d3_small, note="checks: c4d3 layers, 4/6 channels, 8×8 images, N = 4"),
    "3c3d": Workload("3c3d", "CIFAR-10 DeepOBS 3c3d, sigmoid (0.9 M params)", 64, _from_file("deepobs_3c3d_cifar10"),
                     check_batch=4, check_build=_3c3d_small,
                     note="checks: 3c3d layers, 4/6/8 channels, 16×16 images, N = 4"),
    "mlp": Workload("mlp", "Fashion-MNIST MLP 784-128-64-10 (0.1 M params)", 1024, _from_file("mlp_fashion_mnist"),
                    note="checks: the same MLP, N = 8"),
    "tiny": Workload("tiny", "tiny MLP 36-12-10 (test workload)", 16, _tiny, check_batch=4),
}

DEFAULT = ("fcnn", "c4d3", "3c3d", "mlp")


def random_batch(example_input, N, dtype=torch.float32, classes=10, seed=0):
    """Random inputs shaped like the example (batch N) and random class labels."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(N, *example_input.shape[1:], generator=generator, dtype=dtype)
    y = torch.randint(0, classes, (N,), generator=generator)
    return x, y
