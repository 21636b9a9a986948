"""Example 3: the top of the GGN spectrum of a small MLP on Fashion-MNIST, with hbpc.linalg.

1. train ``Flatten → Linear(784, 64) → tanh → Linear(64, 10)`` (50,890 parameters) with Adam
   (lr 1e-3, batch 128) for ``--steps`` steps;
2. compile its curvature module with ``hbpc.compile_model`` (in float64) and run
   ``forward_backward`` on one batch of ``--batch-size`` training images;
3. the 10 largest eigenvalues of the full GGN ``G = Jᵀ ∇²_z L J`` (``full_operator``) by
   ``lanczos`` (torch, full reorthogonalisation), checked against SciPy's ``eigsh`` on the same
   operator as a ``LinearOperator``, and next to them those of the block-diagonal GGN
   ``diag(G_θθ)`` (``block_product_operator``), the matrix block-diagonal Newton methods use;
4. ``tr(G)`` by Hutch++ and Hutchinson, and the share of it in the top 10 eigenvalues;
5. print everything and save ``spectrum.png``.

Without Fashion-MNIST, scikit-learn's 8x8 digits are used (the first layer is then 64 → 64).

    python examples/03_spectrum.py --steps 300 --out out/03_spectrum
"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

import _common  # noqa: E402
import hbpc  # noqa: E402
from hbpc.data import DatasetMissing, ImageData, load_digits, load_fashion_mnist  # noqa: E402
from hbpc.linalg import (  # noqa: E402
    block_product_operator,
    eigsh,
    full_operator,
    hutchinson_trace,
    hutchpp_trace,
    lanczos,
)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
K, HIDDEN, TRAIN_BATCH, TRACE_MATVECS = 10, 64, 128, 150


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=FASHION_MNIST_DIR, help="Fashion-MNIST IDX folder (default: %(default)s)")
    p.add_argument("--steps", type=int, default=300, help="Adam steps before the analysis (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=1000, help="images in the curvature batch (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, batches and probes (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("out/03_spectrum"), help="folder for spectrum.png")
    return p.parse_args(argv)


def load(data_dir: str) -> tuple[ImageData, str]:
    """Fashion-MNIST's training images, else scikit-learn's digits (with a note)."""
    try:
        return load_fashion_mnist(data_dir, "train"), "Fashion-MNIST"
    except DatasetMissing as error:
        print(f"note: {error}\nnote: falling back to scikit-learn's digits (8x8 images)")
        return load_digits(split="train"), "digits"


def build_model(image_shape: torch.Size, seed: int) -> nn.Sequential:
    """``Flatten → Linear(d, 64) → tanh → Linear(64, 10)`` with seeded default initialization."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(image_shape.numel(), HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 10))


def spectrum(curvature, seed: int) -> dict[str, Tensor | float]:
    """Top-``K`` eigenvalues of ``G`` (Lanczos, eigsh) and of ``diag(G_θθ)``, and trace estimates of ``G``."""
    G = full_operator(curvature, "ggn")
    return dict(
        lanczos=lanczos(G, K, generator=seed)[0],
        eigsh=eigsh(G, K, generator=seed)[0],
        blocks=lanczos(block_product_operator(curvature, "ggn"), K, generator=seed)[0],
        hutchpp=hutchpp_trace(G, TRACE_MATVECS, generator=seed).item(),
        hutchinson=hutchinson_trace(G, TRACE_MATVECS, generator=seed).item(),
        n=G.shape[0],
    )


def report(result: dict, dataset: str, batch_size: int) -> None:
    """Print the eigenvalues side by side and the traces."""
    print(f"top-{K} GGN eigenvalues ({dataset}, batch {batch_size}, n = {result['n']:,} parameters):")
    print("   k      lanczos        eigsh   block-diagonal")
    for k, (a, b, c) in enumerate(zip(result["lanczos"], result["eigsh"], result["blocks"]), 1):
        print(f"  {k:2d}  {a:11.5g}  {b:11.5g}  {c:15.5g}")
    share = result["lanczos"].sum().item() / result["hutchpp"]
    print(f"tr(G) ≈ {result['hutchpp']:.5g} (Hutch++, {TRACE_MATVECS} products), "
          f"{result['hutchinson']:.5g} (Hutchinson, {TRACE_MATVECS} products); top {K} hold {share:.1%}")


def plot(result: dict, title: str, path: Path) -> None:
    """Eigenvalues (log scale) on the left, the cumulative share of the trace on the right."""
    ks, values = list(range(1, K + 1)), {key: result[key].tolist() for key in ("lanczos", "eigsh", "blocks")}
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.semilogy(ks, values["lanczos"], "o-", label="full GGN, Lanczos")
    left.semilogy(ks, values["eigsh"], "x", markersize=9, label="full GGN, SciPy eigsh")
    left.semilogy(ks, values["blocks"], "s--", fillstyle="none", label="block-diagonal GGN, Lanczos")
    left.set(xlabel="k", ylabel=r"eigenvalue $\lambda_k$", title=f"top {K} eigenvalues", xticks=ks)
    left.legend()
    share = (result["lanczos"].cumsum(0) / result["hutchpp"]).tolist()
    right.bar(ks, share, color="tab:blue")
    right.set(xlabel="k", ylabel=r"$(\lambda_1 + \dots + \lambda_k)\,/\,\mathrm{tr}(G)$", ylim=(0, 1), xticks=ks,
              title=f"share of tr(G) ≈ {result['hutchpp']:.3g} (Hutch++)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    """Train, compile, analyse, print and plot."""
    args = parse(argv)
    data, dataset = load(args.data_dir)
    model = build_model(data.images.shape[1:], args.seed)
    loss = _common.adam_steps(model, _common.batches(data, TRAIN_BATCH, args.seed), args.steps)
    print(f"Adam: {args.steps} steps on {dataset}, last batch loss {loss:.4f}")
    model.double()
    x, y = data.images[: args.batch_size].double(), data.labels[: args.batch_size]
    curvature = hbpc.compile_model(model, x[:2], nn.CrossEntropyLoss()).Curvature(model)
    curvature.forward_backward(x, y)
    result = spectrum(curvature, args.seed)
    report(result, dataset, len(y))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "spectrum.png"
    plot(result, f"GGN spectrum of a tanh MLP on {dataset} after {args.steps} Adam steps (batch {len(y)})", path)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
