"""What a run is built from: the data, the seeded model, its compiled curvature module and the optimizer.

The model files live in the repository's ``examples/models``; their curvature modules are compiled into
``OUT/generated`` and reused while the generated text is unchanged.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from hbpc.data import ImageData, load_cifar10, load_fashion_mnist
from hbpc.experiments.protocols import ADAM, KFAC, NEWTON, SGD, Architecture, Method

MODELS_DIR = Path(__file__).resolve().parents[2] / "examples" / "models"
Update = Callable[[Tensor, Tensor], float]


class SetupError(RuntimeError):
    """Something a run needs is missing or inconsistent; the message says what to do."""


def load_data(dataset: str, data_dir=None) -> tuple[ImageData, ImageData]:
    """``(train, test)`` of ``dataset``, standardized as in the paper.

    CIFAR-10 uses the paper's per-channel mean and std; Fashion-MNIST (one channel) is standardized with
    its training set's pixel mean and std. Raises ``hbpc.data.DatasetMissing`` when the files are absent.
    """
    if dataset == "cifar10":
        return load_cifar10(data_dir, "train", normalize=True), load_cifar10(data_dir, "test", normalize=True)
    train, test = load_fashion_mnist(data_dir, "train"), load_fashion_mnist(data_dir, "test")
    mean, std = train.images.mean(), train.images.std()
    return ImageData((train.images - mean) / std, train.labels), ImageData((test.images - mean) / std, test.labels)


def subset(data: ImageData, size: int | None, generator: torch.Generator | None = None) -> ImageData:
    """``size`` random samples of ``data`` (the first ``size`` without ``generator``; all when ``None``)."""
    if size is None or size >= len(data.labels):
        return data
    index = torch.randperm(len(data.labels), generator=generator)[:size] if generator else torch.arange(size)
    return ImageData(data.images[index], data.labels[index])


def model_file(architecture: Architecture, dataset: str) -> Path:
    """The model file of ``architecture`` for ``dataset``; ``SetupError`` if the repository lacks it."""
    path = MODELS_DIR / architecture.files[dataset]
    if not path.is_file():
        raise SetupError(f"model file {path} not found: hbpc-experiments runs from a checkout of the hbpc "
                         "repository (it reads examples/models); install it with `pip install -e .`")
    return path


def load_spec(architecture: Architecture, dataset: str):
    """The ``hbpc.export.ModelSpec`` (model, example input, loss) of ``architecture`` for ``dataset``."""
    from hbpc.export import load_model_file

    return load_model_file(model_file(architecture, dataset))


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and random, as the paper's ``set_seeds``."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


@torch.no_grad()
def initialize(model: nn.Module, scheme: str) -> None:
    """Redraw every Linear/Conv parameter from the global torch RNG with ``scheme`` (see ``Architecture``)."""
    for module in model.modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        if scheme == "default":
            module.reset_parameters()
            continue
        normal = scheme == "xavier_normal" or isinstance(module, nn.Conv2d)
        (nn.init.xavier_normal_ if normal else nn.init.xavier_uniform_)(module.weight)
        nn.init.zeros_(module.bias)


def compiled_module(spec, path: Path):
    """The generated curvature module of ``spec`` at ``path``: rewritten only when the compiler's output changed."""
    from hbpc.compiler import compile_source, import_generated, write_atomically

    text = compile_source(spec.model, spec.example_input, spec.loss_fn, source_name=Path(spec.path).name)
    if not path.is_file() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, text)
    return import_generated(path)


def torch_update(model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer) -> Update:
    """``update(x, y)``: autograd gradient, ``optimizer.step()``; returns the batch loss before the step."""
    def update(x: Tensor, y: Tensor) -> float:
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        return loss.item()
    return update


def curvature_update(curvature, optimizer: torch.optim.Optimizer) -> Update:
    """``update(x, y)`` for NewtonCG and KFAC: the generated gradient pass caches what they need."""
    def update(x: Tensor, y: Tensor) -> float:
        optimizer.zero_grad()
        loss = curvature.forward_backward(x, y)
        optimizer.step()
        return loss.item()
    return update


def make_update(method: Method, model: nn.Module, loss_fn: nn.Module, curvature_module, seed: int) -> Update:
    """The training step of ``method`` on ``model`` (``curvature_module`` only for KFAC and CG-Newton)."""
    from hbpc.optim import KFAC as KFACOptimizer
    from hbpc.optim import NewtonCG

    params = model.parameters()
    if method.optimizer == SGD:
        return torch_update(model, loss_fn, torch.optim.SGD(params, **method.hyper))
    if method.optimizer == ADAM:
        return torch_update(model, loss_fn, torch.optim.Adam(params, **method.hyper))
    curvature = curvature_module.Curvature(model)
    if method.optimizer == KFAC:
        generator = torch.Generator().manual_seed(seed)
        return curvature_update(curvature, KFACOptimizer(params, curvature, generator=generator, **method.hyper))
    if method.optimizer == NEWTON:
        return curvature_update(curvature, NewtonCG(params, curvature, **method.hyper))
    raise SetupError(f"unknown optimizer {method.optimizer!r} in method {method.key!r}")


def machine() -> dict:
    """Cores available to this process, the CPU model and the torch version."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"nproc": cores, "cpu": cpu, "torch": torch.__version__, "threads": torch.get_num_threads()}
