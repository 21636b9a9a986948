"""Data-parallel curvature: 2 gloo processes on CPU (``torch.multiprocessing.spawn``) equal one process, float64.

Each rank holds a shard of the 5 batches (4, 4, 4, 4, 3 samples: rank 0 gets batches 0, 2, 4, rank 1
batches 1, 3) for the dataset-level quantities, and half of every training batch for NewtonCG and KFAC
under ``DistributedDataParallel``.
"""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import hbpc
from hbpc.distributed import DistributedCurvature
from hbpc.linalg import (
    block_product_operator,
    blocks,
    forward_backward,
    full_operator,
    kronecker_factors,
)
from hbpc.optim import KFAC, NewtonCG
from models import SETTINGS

SETTING = next(s for s in SETTINGS if s.id == "linear-sigmoid-linear_ce-mean")
SIZES = (4, 4, 4, 4, 3)
WORLD = 2
STEPS = 3
TRAIN_BATCH = 6  # per step, split 3 + 3 over the ranks


def batches():
    x, t = SETTING.data(sum(SIZES))
    return list(zip(torch.split(x, list(SIZES)), torch.split(t, list(SIZES))))


def training_batches():
    x, t = SETTING.data(STEPS * TRAIN_BATCH, seed=5)
    return list(zip(torch.split(x, TRAIN_BATCH), torch.split(t, TRAIN_BATCH)))


def dataset_quantities(module, data):
    """Every dataset-level quantity of a fresh model over ``data`` (all-reduced under a process group)."""
    model = SETTING.build()
    curvature = module.Curvature(model)
    out = {
        "ggn": full_operator(curvature, "ggn", data=data).to_dense(),
        "hessian-blocks": block_product_operator(curvature, "hessian", data=data).to_dense(),
        "hbp-blocks": {k: b.to_dense() for k, b in blocks(curvature, data, "pch-abs").items()},
        "kflr": {k: b.to_dense() for k, b in kronecker_factors(curvature, data, "kflr").items()},
    }
    out["loss"] = forward_backward(curvature, data)
    out["grad"] = [p.grad.clone() for p in model.parameters()]
    return out


def train(module, optimizer_name, steps, shard=None):
    """Parameters after ``steps`` steps; with ``shard`` (rank, world) under DDP on that half of every batch."""
    model = SETTING.build()
    curvature = module.Curvature(model)
    ddp = None
    if shard is not None:
        ddp = DistributedDataParallel(model)
        curvature = DistributedCurvature(curvature)
    if optimizer_name == "newton-full":
        optimizer = NewtonCG(model.parameters(), curvature, lr=0.5, alpha=0.1, source="full", curvature="ggn",
                             cg_maxiter=20)
    elif optimizer_name == "newton-split":
        optimizer = NewtonCG(model.parameters(), curvature, lr=0.5, alpha=0.1, source="block_products",
                             curvature="hessian", split=2, cg_maxiter=20)
    else:
        optimizer = KFAC(model.parameters(), curvature, lr=0.1, damping=1e-2, kind="kflr", factor_interval=1,
                         inverse_interval=1)
    for x, t in training_batches()[:steps]:
        optimizer.zero_grad()
        if shard is not None:
            rank, world = shard
            x, t = x.chunk(world)[rank], t.chunk(world)[rank]
            SETTING.loss_fn()(ddp(x), t).backward()
        curvature.forward_backward(x, t)
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


def worker(rank, world, folder):
    os.environ["HBPC_CACHE_DIR"] = os.environ.get("HBPC_CACHE_DIR", os.path.join(folder, "cache"))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        module = hbpc.compile_model(SETTING.build(), SETTING.data(2)[0], SETTING.loss_fn())
        shard = batches()[rank::world]
        result = {"dataset": dataset_quantities(module, shard)}
        for name in ("newton-full", "newton-split", "kfac"):
            result[name] = train(module, name, STEPS, shard=(rank, world))
        torch.save(result, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def assert_equal(mine, reference, where):
    if isinstance(reference, dict):
        assert list(mine) == list(reference), where
        for key in reference:
            assert_equal(mine[key], reference[key], f"{where}/{key}")
    elif isinstance(reference, list):
        for i, (a, b) in enumerate(zip(mine, reference)):
            assert_equal(a, b, f"{where}[{i}]")
    else:
        torch.testing.assert_close(mine, reference, rtol=1e-11, atol=1e-13, msg=lambda m: f"{where}: {m}")


def test_two_gloo_processes_equal_one_process(tmp_path):
    mp.spawn(worker, args=(WORLD, str(tmp_path)), nprocs=WORLD, join=True)
    module = hbpc.compile_model(SETTING.build(), SETTING.data(2)[0], SETTING.loss_fn())
    reference = {"dataset": dataset_quantities(module, batches())}
    for name in ("newton-full", "newton-split", "kfac"):
        reference[name] = train(module, name, STEPS)
    untrained = [p.detach() for p in SETTING.build().parameters()]
    for rank in range(WORLD):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert_equal(result, reference, f"rank {rank}")
    for name in ("newton-full", "newton-split", "kfac"):  # the steps moved the parameters
        assert any((p - q).abs().max() > 1e-3 for p, q in zip(reference[name], untrained)), name
