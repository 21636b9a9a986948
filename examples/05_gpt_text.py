"""Tutorial 5: a small GPT as a character-level language model, K-FAC against Adam.

The text ships with every Python installation: the standard library's own source files (``hbpc.data.text``).
The model is ``examples/models/gpt_char.py`` (nanoGPT-style: 2 layers, d = 32, 2 heads, causal mask, tied
input/output embedding), compiled once by hbpc; ``hbpc.optim.KFAC`` preconditions every Linear layer shared over
the tokens with its Kronecker factors (KFAC-expand), Adam is the baseline. Both start from the same weights and see
the same batches; the validation loss (nats per character) is measured on fixed held-out windows.

    python examples/05_gpt_text.py                      # ~2-3 minutes on 2 cores
    python examples/05_gpt_text.py --steps 20 --max-chars 20000 --out /tmp/gpt

Writes ``curves.csv`` and ``curves.png`` (validation loss against steps and seconds) to ``--out`` and prints a table.
"""
import argparse
import copy
import csv
import importlib.util
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import hbpc  # noqa: E402
from hbpc.data.text import VOCABULARY, load_stdlib_text, token_batches  # noqa: E402
from hbpc.optim import KFAC  # noqa: E402

MODEL_FILE = Path(__file__).parent / "models" / "gpt_char.py"


def gpt_module():
    """examples/models/gpt_char.py as a module (its GPT takes the sizes as keyword arguments)."""
    spec = importlib.util.spec_from_file_location("gpt_char", MODEL_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--block", type=int, default=64, help="characters per window (T)")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--max-chars", type=int, default=300_000, help="characters of the corpus read")
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--damping", type=float, default=1e-2, help="K-FAC's damping (1e-3, its default, diverges here)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="gpt_text_out")
    return parser.parse_args(argv)


def validation_loss(model, loss_fn, windows) -> float:
    with torch.no_grad():
        return sum(float(loss_fn(model(x), y)) for x, y in windows) / len(windows)


def train(name, model, loss_fn, step, batches, windows, eval_every):
    """Rows (optimizer, step, seconds, train loss, validation loss); seconds count the training steps only."""
    rows, seconds = [(name, 0, 0.0, float("nan"), validation_loss(model, loss_fn, windows))], 0.0
    for k, (x, y) in enumerate(batches, 1):
        t0 = time.perf_counter()
        loss = step(x, y)
        seconds += time.perf_counter() - t0
        if k % eval_every == 0 or k == len(batches):
            rows.append((name, k, seconds, float(loss), validation_loss(model, loss_fn, windows)))
    return rows


def main(argv=None):
    args = parse(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = load_stdlib_text(args.max_chars)
    generator = torch.Generator().manual_seed(0)
    batches = list(token_batches(corpus.train, args.batch, args.block, args.steps, generator))
    windows = list(token_batches(corpus.val, 64, args.block, 2, generator))
    torch.manual_seed(0)
    initial = gpt_module().GPT(vocab=len(VOCABULARY), width=args.width, layers=args.layers, block=args.block)
    loss_fn = nn.CrossEntropyLoss()
    print(f"corpus: {len(corpus.train):,} training and {len(corpus.val):,} validation characters from "
          f"{len(corpus.files)} standard-library files; model: {sum(p.numel() for p in initial.parameters()):,} "
          "parameters")
    t0 = time.perf_counter()
    module = hbpc.compile_model(initial, batches[0][0], loss_fn)
    print(f"hbpc compiled the GPT in {time.perf_counter() - t0:.0f} s")

    model = copy.deepcopy(initial)
    curvature = module.Curvature(model)
    kfac = KFAC(model.parameters(), curvature, damping=args.damping)

    def kfac_step(x, y):
        loss = curvature.forward_backward(x, y)  # loss, gradient and the caches the factors read
        kfac.step()
        return loss

    rows = train("K-FAC (hbpc)", model, loss_fn, kfac_step, batches, windows, args.eval_every)

    baseline = copy.deepcopy(initial)
    adam = torch.optim.Adam(baseline.parameters(), lr=3e-3)

    def adam_step(x, y):
        adam.zero_grad()
        loss = loss_fn(baseline(x), y)
        loss.backward()
        adam.step()
        return loss.detach()

    rows += train("Adam (lr 3e-3)", baseline, loss_fn, adam_step, batches, windows, args.eval_every)

    with (out / "curves.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["optimizer", "step", "seconds", "train_loss", "val_loss"])
        writer.writerows(rows)
    names = list(dict.fromkeys(row[0] for row in rows))
    figure, (by_step, by_time) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for name in names:
        mine = [row for row in rows if row[0] == name]
        by_step.plot([r[1] for r in mine], [r[4] for r in mine], marker="o", label=name)
        by_time.plot([r[2] for r in mine], [r[4] for r in mine], marker="o", label=name)
    by_step.set(xlabel="step", ylabel="validation loss (nats / character)")
    by_time.set(xlabel="seconds (training steps only)", ylabel="validation loss (nats / character)")
    by_step.legend()
    figure.suptitle("2-layer GPT on the standard library's sources")
    figure.savefig(out / "curves.png", dpi=100)
    plt.close(figure)

    print(f"\nfinal validation loss after {args.steps} steps (batch {args.batch}, T = {args.block}):\n")
    print("| optimizer | validation loss | seconds | seconds per step |")
    print("|---|---|---|---|")
    for name in names:
        last = [row for row in rows if row[0] == name][-1]
        print(f"| {name} | {last[4]:.3f} | {last[2]:.1f} | {last[2] / max(last[1], 1):.3f} |")
    print(f"\nwrote {out / 'curves.csv'} and {out / 'curves.png'}")
    return rows


if __name__ == "__main__":
    main()
