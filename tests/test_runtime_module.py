"""A generated module needs only torch and hbpc.runtime: it imports and runs every product with the compiler's
dependencies (sympy, networkx) and the compiler itself blocked."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r'''
import sys

BLOCKED = ("sympy", "networkx", "hbpc.compiler", "hbpc.export", "hbpc.derive", "hbpc.plan", "hbpc.emit", "hbpc.rules")


class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED or any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError(f"{name} is blocked")


sys.meta_path.insert(0, Blocker())
import importlib.util

import torch

spec = importlib.util.spec_from_file_location("curv_model", sys.argv[1])
curv_model = importlib.util.module_from_spec(spec)
spec.loader.exec_module(curv_model)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10)).double()
curvature = curv_model.Curvature(model)
x, y = torch.randn(3, 1, 28, 28, dtype=torch.float64), torch.tensor([0, 3, 9])
loss = curvature.forward_backward(x, y)
vs = [torch.randn_like(p) for p in model.parameters()]
generator = torch.Generator().manual_seed(0)
results = [curvature.ggn_vector_product(vs), curvature.hessian_vector_product(vs),
           curvature.fisher_mc_vector_product(vs, 2, generator)]
for name, product in curvature.block_products("hessian", split=2).items():
    results.append([product(torch.randn_like(dict(model.named_parameters())[name]))])
for curvature_name in ("ggn", "hessian", "pch-abs", "pch-clip"):
    results += [[block.to_dense()] for block in curvature.blocks(curvature_name).values()]
for kind in ("kflr", "kfac", "kfra"):
    results += [[block.to_dense()] for block in curvature.kronecker_factors(kind, generator=generator).values()]
assert all(torch.isfinite(t).all() for result in results for t in result)
loaded = [m for m in ("sympy", "networkx") if m in sys.modules]
assert not loaded, loaded
print("ok", len(results))
'''


def test_generated_module_runs_every_product_without_the_compiler():
    golden = ROOT / "examples" / "generated" / "logreg_fashion_mnist.py"
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(golden)], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("ok ")


def test_a_module_printed_for_another_table_format_is_refused_at_import(tmp_path):
    """A module compiled by another hbpc (other table layout, or none stated) fails on import, saying to recompile."""
    import pytest

    from hbpc.compiler import import_generated

    text = (ROOT / "examples" / "generated" / "logreg_fashion_mnist.py").read_text()
    current = next(line for line in text.splitlines() if line.strip().startswith("RUNTIME_FORMAT = "))
    for variant, replacement in (("older", "    RUNTIME_FORMAT = 1"), ("unstated", "")):
        path = tmp_path / f"curv_{variant}.py"
        path.write_text(text.replace(current + "\n", replacement + "\n" if replacement else ""))
        with pytest.raises(ImportError, match=r"table format (1|None) .*recompile the model with `hbpc compile"):
            import_generated(path)
