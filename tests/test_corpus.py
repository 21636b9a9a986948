"""The corpus of model files in `tests/corpus/`: each compiles cleanly or fails with one clear error.

Every corpus file starts with a comment block of directives:

* `# outcome: error` (the default): `hbpc compile FILE -o OUT` exits with status 2, stderr starts
  with `hbpc: error: `, holds no traceback, and neither OUT nor a temporary file is left behind;
* `# outcome: compiles`: the compile exits with 0, and the generated module binds to the file's
  model, reproduces `loss_fn(model(x), t)` and its gradients on `example_input` and, in float64,
  gives the true Hessian / GGN blocks (`block_products`, and `blocks` at N = 1);
* `# outcome: compiles-or-clean-error`: either of the two (parameter names that look like code);
* `# expect: FRAGMENT`: a fragment stderr must contain; `{here}` stands for `FILE:LINE` of the line
  marked `# here`;
* `# args: ...`: extra command-line arguments;
* `# blocks: inexact`: HBP `blocks` need not be exact at N = 1 (tied weights: cross-use terms are
  not in HBP blocks); `block_products` still must be;
* `# ggn: logits`: the GGN linearizes up to the logits before a final LogSoftmax (NLLLoss);
* `# xfail: REASON`: hbpc does not behave as the directives say yet (the test is `xfail(strict=True)`,
  so it fails once hbpc is fixed: then delete the line).
"""
import copy
import shlex
import sys
import traceback
from pathlib import Path

import pytest
import torch

from hbpc.cli import main
from hbpc.compiler import import_generated
from hbpc.export import load_model_file
from reference import ggn_block, hessian_block

CORPUS = Path(__file__).resolve().parent / "corpus"
FILES = sorted(CORPUS.glob("*.py"))
OUTCOMES = ("error", "compiles", "compiles-or-clean-error")


def directives(path: Path) -> dict:
    """The header directives of a corpus file, with `{here}` resolved."""
    found = {"outcome": "error", "expect": [], "args": [], "xfail": None, "blocks": "exact", "ggn": "output"}
    lines = path.read_text().splitlines()
    marks = [number for number, line in enumerate(lines, 1) if line.rstrip().endswith("# here")]
    here = f"{path.name}:{marks[0]}" if marks else None
    for line in lines:
        if not line.startswith("#"):
            break
        key, _, value = line[1:].strip().partition(":")
        value = value.strip()
        if key == "expect":
            assert "{here}" not in value or here, f"{path.name}: {{here}} without a `# here` line"
            found["expect"].append(value.replace("{here}", here or ""))
        elif key == "args":
            found["args"] = shlex.split(value)
        elif key in ("outcome", "xfail", "blocks", "ggn"):
            found[key] = value
    assert found["outcome"] in OUTCOMES, f"{path.name}: unknown outcome {found['outcome']!r}"
    return found


def _params():
    params = []
    for path in FILES:
        spec = directives(path)
        marks = [pytest.mark.xfail(strict=True, reason=spec["xfail"])] if spec["xfail"] else []
        params.append(pytest.param(path, id=path.stem, marks=marks))
    return params


def compile_file(path: Path, folder: Path, capsys, args=()):
    """Copy `path` into `folder`, run `hbpc compile` on it; (status, stderr, output path).

    An exception escaping `main` is what a user would see as a traceback: it becomes stderr.
    """
    model_file = folder / path.name
    model_file.write_text(path.read_text())
    out = folder / "curv_model.py"
    try:
        status = main(["compile", str(model_file), "-o", str(out), *args])
    except SystemExit as exit_:
        status = exit_.code
    except BaseException:  # noqa: BLE001 - a leaked exception is the failure under test
        status = "raised"
        print(traceback.format_exc(), file=sys.stderr)
    return status, capsys.readouterr().err, out


def _target(loss_fn, output):
    """Class indices for (log-)softmax losses, else a dense target in [0, 1) shaped like the output."""
    if isinstance(loss_fn, (torch.nn.CrossEntropyLoss, torch.nn.NLLLoss)):
        return torch.arange(output.shape[0]) % output.shape[1]
    return torch.rand(output.shape, generator=torch.Generator().manual_seed(0), dtype=output.dtype)


def _logits_ggn_block(model, loss_fn, x, t, name):
    """The GGN linearized up to the logits of `Sequential(..., LogSoftmax)` + NLLLoss (docs/curvature.md)."""
    body = torch.nn.Sequential(*list(model)[:-1])
    return ggn_block(body, torch.nn.CrossEntropyLoss(reduction=loss_fn.reduction), x, t, name)


def check_compiled_module(model_file: Path, out: Path, exact_blocks: bool = True, ggn: str = "output"):
    """The generated module binds to the file's model, matches autograd's loss and gradients on
    `example_input`, and (in float64) its `block_products` and N = 1 `blocks` for `hessian` and
    `ggn` equal the true Hessian and GGN blocks of the trainable parameters."""
    spec = load_model_file(model_file)
    module = import_generated(out, name=f"hbpc_corpus_{model_file.stem}")
    model, x = spec.model, spec.example_input
    loss_fn = spec.loss_fn if spec.loss_fn is not None else torch.nn.CrossEntropyLoss()
    reference = copy.deepcopy(model)
    t = _target(loss_fn, reference(x))
    expected = loss_fn(reference(x), t)
    if expected.requires_grad:
        expected.backward()
    curvature = module.Curvature(model)
    loss = curvature.forward_backward(x, t)
    assert torch.allclose(loss, expected.detach(), rtol=1e-5, atol=1e-6)
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        if q.grad is None:
            assert p.grad is None, f"{name}: p.grad is set, loss.backward() leaves it None"
        else:
            assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-6), name

    model = copy.deepcopy(model).double()
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    for N in (x.shape[0], 1):
        x64 = x[:N].double() if x.is_floating_point() else x[:N]  # token ids stay integers
        t64 = t[:N].double() if t.is_floating_point() else t[:N]
        curvature = module.Curvature(model)
        curvature.forward_backward(x64, t64)
        exact_ggn = _logits_ggn_block if ggn == "logits" else ggn_block
        for curvature_name, exact in (("hessian", hessian_block), ("ggn", exact_ggn)):
            products = curvature.block_products(curvature_name)
            blocks = curvature.blocks(curvature_name) if N == 1 and exact_blocks else {}
            for name, p in trainable.items():
                truth = exact(model, loss_fn, x64, t64, name)
                eye = torch.eye(p.numel(), dtype=p.dtype).reshape(-1, *p.shape)
                dense = products[name](eye).reshape(p.numel(), p.numel())
                assert torch.allclose(dense, truth, atol=1e-9), f"N={N}: block_products({curvature_name!r})[{name!r}]"
                if blocks:
                    assert torch.allclose(blocks[name].to_dense(), truth, atol=1e-9), \
                        f"N=1: blocks({curvature_name!r})[{name!r}]"


@pytest.mark.parametrize("path", _params())
def test_corpus_file(path, tmp_path, capsys):
    spec = directives(path)
    status, err, out = compile_file(path, tmp_path, capsys, spec["args"])
    assert "Traceback" not in err, err
    if spec["outcome"] == "compiles-or-clean-error" and status == 2:
        spec["outcome"] = "error"
    if spec["outcome"] == "error":
        assert status == 2, f"exit status {status}, stderr: {err}"
        assert err.startswith("hbpc: error: "), err
        assert err.count("hbpc: error: ") == 1, err
        for fragment in spec["expect"]:
            assert fragment in err, f"missing {fragment!r} in:\n{err}"
        assert sorted(p.name for p in tmp_path.iterdir()) == [path.name], "output or temporary file left behind"
    else:
        assert status == 0, f"exit status {status}, stderr: {err}"
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, out.name])
        compile(out.read_text(), str(out), "exec")
        check_compiled_module(tmp_path / path.name, out, exact_blocks=spec["blocks"] == "exact", ggn=spec["ggn"])


def test_corpus_is_large_and_well_formed():
    errors = [path for path in FILES if directives(path)["outcome"] == "error"]
    assert len(errors) >= 30
    for path in errors:
        assert directives(path)["expect"], f"{path.name} names no expected fragment"


# ---------------------------------------------------------------- output paths

GOOD = CORPUS / "ok_relu_inplace_module.py"


def _compile_to(tmp_path, capsys, output):
    model_file = tmp_path / "model.py"
    model_file.write_text(GOOD.read_text())
    try:
        status = main(["compile", str(model_file), "-o", str(output)])
    except BaseException:  # noqa: BLE001
        status = "raised"
        print(traceback.format_exc(), file=sys.stderr)
    return status, capsys.readouterr().err


def _assert_clean_error(status, err, *fragments):
    assert "Traceback" not in err, err
    assert status == 2, f"exit status {status}, stderr: {err}"
    assert err.startswith("hbpc: error: "), err
    for fragment in fragments:
        assert fragment in err, f"missing {fragment!r} in:\n{err}"


def test_output_folder_missing(tmp_path, capsys):
    status, err = _compile_to(tmp_path, capsys, tmp_path / "nowhere" / "out.py")
    _assert_clean_error(status, err, "output folder", "nowhere", "create the folder or pick another -o")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.py"]


def test_output_folder_is_a_file(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("keep me")
    status, err = _compile_to(tmp_path, capsys, tmp_path / "notes.txt" / "out.py")
    _assert_clean_error(status, err, "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_output_is_a_folder(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    status, err = _compile_to(tmp_path, capsys, tmp_path / "out")
    _assert_clean_error(status, err, "is a folder", "pass a file name")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.py", "out"]
    assert list((tmp_path / "out").iterdir()) == []


def test_output_folder_not_writable(tmp_path, capsys, monkeypatch):
    """An unwritable folder (simulated: the suite may run as root, who can write anywhere)."""
    import hbpc.compiler

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(hbpc.compiler.tempfile, "mkstemp", refuse)
    status, err = _compile_to(tmp_path, capsys, tmp_path / "out.py")
    _assert_clean_error(status, err, "cannot write", "out.py", "Permission denied", "choose a writable output path")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.py"]


def test_output_disk_full(tmp_path, capsys, monkeypatch):
    import hbpc.compiler

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hbpc.compiler.os, "replace", full)
    status, err = _compile_to(tmp_path, capsys, tmp_path / "out.py")
    _assert_clean_error(status, err, "cannot write", "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.py"]


def test_output_would_overwrite_the_model_file(tmp_path, capsys):
    model_file = tmp_path / "model.py"
    status, err = _compile_to(tmp_path, capsys, model_file)
    _assert_clean_error(status, err, "model.py")
    assert model_file.read_text() == GOOD.read_text()


def test_existing_output_is_replaced_whole(tmp_path, capsys):
    out = tmp_path / "out.py"
    out.write_text("old")
    status, err = _compile_to(tmp_path, capsys, out)
    assert status == 0, err
    assert out.read_text().startswith("# Generated by hbpc") and "class Curvature" in out.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.py", "out.py"]
