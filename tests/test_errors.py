"""Bad input gets one clear message, exit status 2 and no output file."""
import textwrap

import pytest
import torch
from torch import nn

import hbpc
from hbpc.cli import main

HEADER = "import torch\nfrom torch import nn\nimport torch.nn.functional as F\n"

CASES = {
    "syntax-error": ("model = nn.Linear(3, 2\n", ["syntax error", "model.py:4"]),
    "no-model": ("example_input = torch.zeros(2, 3)\n", ["defines no `model` nn.Module", "build_model()"]),
    "model-not-module": ("model = 3\nexample_input = torch.zeros(2, 3)\n", ["found int"]),
    "no-example-input": ("model = nn.Linear(3, 2)\n", ["no `example_input` tensor (found nothing)"]),
    "example-input-not-tensor": ("model = nn.Linear(3, 2)\nexample_input = [1, 2]\n", ["found list"]),
    "example-input-wrong-shape": ("model = nn.Linear(3, 2)\nexample_input = torch.zeros(2, 5)\n",
                                  ["forward pass failed on example_input", "check example_input's shape"]),
    "no-batch-dimension": ("model = nn.Linear(3, 2)\nexample_input = torch.zeros(3)\n",
                           ["first dimension must be the batch"]),
    "file-raises": ("raise RuntimeError('boom')\n", ["raised RuntimeError: boom", "model.py:4"]),
    "build-model-raises": ("def build_model():\n    raise ValueError('no')\nexample_input = torch.zeros(2, 3)\n",
                           ["build_model() raised ValueError: no"]),
    "unsupported-op": (textwrap.dedent("""
        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(3, 2)
            def forward(self, x):
                return F.softmin(self.fc(x), dim=1)
        model = M()
        example_input = torch.zeros(2, 3)
        """), ["unsupported op 'softmin'", "node `softmin`", "model.py:10", "supported ops: add, avg_pool1d, avg_pool2d, avg_pool3d, batch_norm, cat"]),
    "control-flow": (textwrap.dedent("""
        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(3, 2)
            def forward(self, x):
                if x.sum() > 0:
                    return self.fc(x)
                return self.fc(-x)
        model = M()
        example_input = torch.zeros(2, 3)
        """), ["torch.fx could not trace the model", "no Python control flow on tensor values", "model.py:10"]),
    "product-of-tensors": (textwrap.dedent("""
        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(3, 3)
            def forward(self, x):
                return torch.relu(self.fc(x)) * x
        model = M()
        example_input = torch.zeros(2, 3)
        """), ["unsupported op 'mul'", "model.py:10"]),
    "broadcast-add": (textwrap.dedent("""
        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(3, 1)
            def forward(self, x):
                return self.fc(x) + x
        model = M()
        example_input = torch.zeros(2, 3)
        """), ["only the sum of two tensors of equal shape is supported"]),
    "unsupported-loss": ("model = nn.Linear(3, 2)\nexample_input = torch.zeros(2, 3)\nloss_fn = nn.L1Loss()\n",
                         ["unsupported loss 'l1loss'", "bce_with_logits, cross_entropy, huber, mse"]),
    "loss-option": ("model = nn.Linear(3, 2)\nexample_input = torch.zeros(2, 3)\n"
                    "loss_fn = nn.CrossEntropyLoss(weight=torch.ones(2))\n",
                    ["CrossEntropyLoss with weight is not supported", "use CrossEntropyLoss() without weight"]),
    "loss-not-module": ("model = nn.Linear(3, 2)\nexample_input = torch.zeros(2, 3)\nloss_fn = 'mse'\n",
                        ["`loss_fn` must be an nn.Module"]),
    "padding-mode": ("model = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1, padding_mode='reflect'), nn.Flatten())\n"
                     "example_input = torch.zeros(2, 1, 4, 4)\nloss_fn = nn.MSELoss()\n",
                     ["only numeric zero padding is supported"]),
    "ce-on-images": ("model = nn.Conv2d(1, 2, 3)\nexample_input = torch.zeros(2, 1, 5, 5)\n",
                     ["needs logits of shape (N, C)", "use MSELoss"]),
}


def _run(tmp_path, body, capsys, *extra):
    model_file = tmp_path / "model.py"
    model_file.write_text(HEADER + body)
    out = tmp_path / "curv_model.py"
    status = main(["compile", str(model_file), "-o", str(out), *extra])
    return status, capsys.readouterr().err, out


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_model_file_gives_one_clear_error(case, tmp_path, capsys):
    body, expected = CASES[case]
    status, err, out = _run(tmp_path, body, capsys)
    assert status == 2
    assert err.startswith("hbpc: error: ")
    for fragment in expected:
        assert fragment in err, (fragment, err)
    assert "Traceback" not in err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model.py"]


def test_missing_model_file(tmp_path, capsys):
    status = main(["compile", str(tmp_path / "absent.py"), "-o", str(tmp_path / "out.py")])
    assert status == 2
    assert "absent.py does not exist" in capsys.readouterr().err


def test_missing_output_folder(tmp_path, capsys):
    status, err, _ = _run(tmp_path, "model = nn.Linear(3, 2)\nexample_input = torch.zeros(2, 3)\n", capsys)
    assert status == 0
    model_file = tmp_path / "model.py"
    status = main(["compile", str(model_file), "-o", str(tmp_path / "nowhere" / "out.py")])
    assert status == 2
    assert "output folder" in capsys.readouterr().err
    assert not (tmp_path / "nowhere").exists()


def test_unknown_rule_name(capsys):
    assert main(["rules", "softmin"]) == 2
    assert "no rule named 'softmin'" in capsys.readouterr().err


def test_loss_override_on_command_line(tmp_path, capsys):
    status, _, out = _run(tmp_path, "model = nn.Linear(3, 2)\nexample_input = torch.zeros(2, 3)\n", capsys,
                          "--loss", "mse:sum")
    assert status == 0
    assert "Loss: mse (sum)." in out.read_text()


def test_generated_module_refuses_mismatched_model():
    module = hbpc.compile_model(nn.Linear(3, 2), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="does not match the compiled architecture.*wrong shape"):
        module.Curvature(nn.Linear(4, 2))
    with pytest.raises(ValueError, match="missing \\['bias'\\]"):
        module.Curvature(nn.Linear(3, 2, bias=False))


def test_generated_module_checks_inputs_and_order():
    model = nn.Linear(3, 2)
    curvature = hbpc.compile_model(model, torch.zeros(2, 3)).Curvature(model)
    with pytest.raises(RuntimeError, match="call forward_backward"):
        curvature.blocks()
    with pytest.raises(ValueError, match="per-sample shape \\(4,\\), expected \\(3,\\)"):
        curvature.forward_backward(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(TypeError, match="x must have dtype torch.float32 .* got a torch.float64 tensor"):
        curvature.forward_backward(torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN or Inf"):
        curvature.forward_backward(torch.full((2, 3), float("nan")), torch.zeros(2, dtype=torch.long))
    curvature.forward_backward(torch.randn(5, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="curvature must be one of"):
        curvature.blocks("fisher")


def test_parameter_names_cannot_inject_code():
    model = nn.Sequential()
    model.add_module("x']); __import__('os')('echo pwned'); (['", nn.Linear(3, 2))
    model.add_module("tanh", nn.Tanh())
    model.add_module("ünï", nn.Linear(2, 2))
    module = hbpc.compile_model(model, torch.zeros(2, 3))
    curvature = module.Curvature(model)
    loss = curvature.forward_backward(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
    assert torch.isfinite(loss)
    assert set(curvature.blocks()) == {name for name, _ in model.named_parameters()}


def test_check_detects_stale_generated_modules(tmp_path, capsys):
    model_file = tmp_path / "model.py"
    model_file.write_text(HEADER + "model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))\n"
                          "example_input = torch.zeros(2, 3)\n")
    out = tmp_path / "curv.py"
    assert main(["compile", str(model_file), "-o", str(out)]) == 0
    assert main(["check", str(out), str(model_file)]) == 0
    assert "is up to date" in capsys.readouterr().out
    model_file.write_text(model_file.read_text().replace("nn.Tanh()", "nn.Sigmoid()"))
    assert main(["check", str(out), str(model_file)]) == 1
    assert "is stale: the model's graph changed" in capsys.readouterr().out
    out.write_text(out.read_text().replace("# hbpc-version: ", "# hbpc-version: 0.0."))
    assert main(["check", str(out), str(model_file)]) == 1
    assert "generated by hbpc 0.0." in capsys.readouterr().out
    (tmp_path / "plain.py").write_text("x = 1\n")
    assert main(["check", str(tmp_path / "plain.py"), str(model_file)]) == 2
    assert "has no hbpc header" in capsys.readouterr().err
