"""hbpc.load_model, hbpc.load_generated, the README's Python snippet as written, and the CLI's rule-file plumbing."""
import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import hbpc
from hbpc.cli import main
from hbpc.errors import HbpcError

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
USER_MODEL = ROOT / "examples" / "user_rules" / "model.py"
USER_RULES = ROOT / "examples" / "user_rules" / "my_rules.py"


def _readme_python_using(word):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)
    matching = [block for block in blocks if word in block]
    assert len(matching) == 1, f"expected one README python block using {word}"
    return matching[0]


def test_readme_snippet_runs_as_written(tmp_path, monkeypatch, capsys):
    """The snippet after `hbpc compile examples/models/cnn_fashion_mnist.py -o curv_model.py`, run in that folder."""
    snippet = _readme_python_using("hbpc.load_generated")
    model_path = re.search(r'hbpc\.load_model\("([^"]+)"\)', snippet).group(1)
    assert f"hbpc compile {model_path} -o curv_model.py" in README.read_text()
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)
    assert main(["compile", model_path, "-o", "curv_model.py"]) == 0
    modules = set(sys.modules)
    namespace = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    assert not [path for path in sys.path if str(tmp_path) in path]
    curvature, model, x, y = namespace["curvature"], namespace["model"], namespace["x"], namespace["y"]
    assert torch.allclose(namespace["loss"], namespace["loss_fn"](model(x), y))
    assert set(namespace["blocks"]) == set(dict(model.named_parameters()))
    assert [h.shape for h in namespace["hv"]] == [p.shape for p in model.parameters()]
    assert set(sys.modules) - modules <= {"hbpc_generated_curv_model"}


def test_load_model_returns_model_input_and_loss(tmp_path):
    model, example, loss_fn = hbpc.load_model(USER_MODEL)
    assert isinstance(model, nn.Module) and example.shape == (2, 4) and type(loss_fn).__name__ == "LogCoshLoss"
    plain = tmp_path / "plain.py"
    plain.write_text("import torch\nfrom torch import nn\nmodel = nn.Linear(3, 2)\nexample_input = torch.zeros(2, 3)\n")
    assert isinstance(hbpc.load_model(plain)[2], nn.CrossEntropyLoss)  # what the compiler assumes
    with pytest.raises(HbpcError, match="does not exist"):
        hbpc.load_model(tmp_path / "missing.py")


def test_load_generated_imports_a_compiled_file(tmp_path):
    out = tmp_path / "curv.py"
    assert main(["compile", str(USER_MODEL), "--rules", str(USER_RULES), "-o", str(out)]) == 0
    module = hbpc.load_generated(out)
    model, x, loss_fn = hbpc.load_model(USER_MODEL)
    t = torch.randn(2, 3)
    assert torch.allclose(module.Curvature(model).forward_backward(x, t), loss_fn(model(x), t))
    with pytest.raises(HbpcError, match="does not exist"):
        hbpc.load_generated(tmp_path / "nothing.py")


def test_check_uses_the_rules_file_recorded_in_the_module(tmp_path, capsys):
    rules = tmp_path / "my_rules.py"
    rules.write_text(USER_RULES.read_text())
    out = tmp_path / "generated" / "curv.py"
    out.parent.mkdir()
    assert main(["compile", str(USER_MODEL), "--rules", str(rules), "-o", str(out)]) == 0
    assert '# rules: "../my_rules.py" sha256:' in out.read_text()
    capsys.readouterr()
    assert main(["check", str(out), str(USER_MODEL)]) == 0
    assert "up to date" in capsys.readouterr().out
    rules.write_text(rules.read_text() + "\n# edited\n")
    assert main(["check", str(out), str(USER_MODEL)]) == 1
    assert "the rules file" in capsys.readouterr().out
    rules.unlink()
    assert main(["check", str(out), str(USER_MODEL)]) == 2
    assert "--rules FILE" in capsys.readouterr().err


def test_rules_command_takes_a_rules_file(capsys):
    assert main(["rules", "swish2", "--rules", str(USER_RULES)]) == 0
    assert "swish2  (elementwise)" in capsys.readouterr().out
    assert main(["rules", "--rules", str(USER_RULES)]) == 0
    listing = capsys.readouterr().out
    assert "swish2" in listing and "logcoshloss" in listing
    assert main(["rules", "swish2"]) == 2
    assert "--rules FILE" in capsys.readouterr().err


def test_rules_listing_and_readme_name_nll_loss_and_batch_norm(capsys):
    assert main(["rules"]) == 0
    assert re.search(r"^nll_loss +loss", capsys.readouterr().out, re.MULTILINE)
    assert main(["rules", "nll_loss"]) == 0
    assert "compiled as cross_entropy" in capsys.readouterr().out
    readme = README.read_text()
    assert "NLLLoss (`nll_loss`)" in readme and "BatchNorm1d/2d in eval mode" in readme


def test_unsupported_op_error_shows_how_to_add_a_rule(tmp_path, capsys):
    model = tmp_path / "model.py"
    model.write_text("import torch\nfrom torch import nn\nmodel = nn.Sequential(nn.Linear(3, 4), nn.Softmin(1))\n"
                     "example_input = torch.zeros(2, 3)\n")
    assert main(["compile", str(model), "-o", str(tmp_path / "o.py")]) == 2
    err = capsys.readouterr().err
    assert "unsupported op 'softmin'" in err
    assert "--rules my_rules.py" in err and "RULES = [Elementwise('softmin', " in err


def test_train_mode_batch_norm_error_suggests_only_eval(capsys):
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).train()
    with pytest.raises(HbpcError) as error:
        hbpc.compile_model(model, torch.zeros(2, 3), nn.CrossEntropyLoss())
    assert "call model.eval()" in str(error.value)
    assert "supported ops" not in str(error.value) and "--rules" not in str(error.value)


def test_a_rules_path_with_quotes_and_newlines_stays_one_comment_line(tmp_path, capsys):
    folder = tmp_path / 'odd "rules"\nfolder'
    folder.mkdir()
    rules = folder / "my_rules.py"
    rules.write_text(USER_RULES.read_text())
    out = tmp_path / "curv.py"
    assert main(["compile", str(USER_MODEL), "--rules", str(rules), "-o", str(out)]) == 0
    header = [line for line in out.read_text().splitlines() if line.startswith("# rules: ")]
    assert header == ['# rules: "odd \\"rules\\"\\nfolder/my_rules.py" sha256:' + header[0].rsplit(":", 1)[1]]
    hbpc.load_generated(out, name="hbpc_test_odd_rules_path")
    assert main(["check", str(out), str(USER_MODEL)]) == 0
