"""User rules: a new activation and a new loss from one sympy line each, with every curvature quantity exact."""
import importlib.util
from pathlib import Path

import torch

import hbpc
from hbpc.cli import main
from hbpc.compiler import import_generated
from test_full_products import _true_ggn, _true_hessian

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "examples" / "user_rules" / "my_rules.py"
MODEL = ROOT / "examples" / "user_rules" / "model.py"


def _model_file():
    spec = importlib.util.spec_from_file_location("user_model", MODEL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_compiles_with_user_rules_and_products_are_exact(tmp_path):
    out = tmp_path / "curv.py"
    assert main(["compile", str(MODEL), "--rules", str(RULES), "-o", str(out)]) == 0
    user = _model_file()
    model = user.model.double()
    curvature = import_generated(out).Curvature(model)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    t = torch.randn(3, 3, generator=generator, dtype=torch.float64)
    loss = curvature.forward_backward(x, t)
    assert torch.allclose(loss, user.loss_fn(model(x), t))
    H, G = _true_hessian(model, user.loss_fn, x, t), _true_ggn(model, user.loss_fn, x, t)
    shapes = [p.shape for p in model.parameters()]
    vs = [torch.randn(2, *s, dtype=torch.float64) for s in shapes]
    flat = torch.cat([v.reshape(2, -1) for v in vs], 1)
    for product, truth in ((curvature.hessian_vector_product, H), (curvature.ggn_vector_product, G)):
        assert torch.allclose(torch.cat([o.reshape(2, -1) for o in product(vs)], 1), flat @ truth.T, atol=1e-10)
    curvature.forward_backward(x[:1], t[:1])
    H1 = _true_hessian(model, user.loss_fn, x[:1], t[:1])
    dense = curvature.blocks("hessian")["0.weight"].to_dense()
    assert torch.allclose(dense, H1[:32, :32], atol=1e-10)


def test_without_the_rules_file_the_op_is_named_as_unsupported(tmp_path, capsys):
    assert main(["compile", str(MODEL), "-o", str(tmp_path / "out.py")]) == 2
    assert "unsupported loss 'logcoshloss'" in capsys.readouterr().err


def test_python_api_takes_a_rules_path():
    user = _model_file()
    module = hbpc.compile_model(user.model, user.example_input, user.loss_fn, rules=str(RULES))
    curvature = module.Curvature(user.model)
    x, t = torch.randn(5, 4), torch.randn(5, 3)
    assert torch.allclose(curvature.forward_backward(x, t), user.loss_fn(user.model(x), t))


def test_bad_rules_file(tmp_path, capsys):
    bad = tmp_path / "rules.py"
    bad.write_text("RULES = []\n")
    assert main(["compile", str(MODEL), "--rules", str(bad), "-o", str(tmp_path / "o.py")]) == 2
    assert "rules file defines no rules" in capsys.readouterr().err
