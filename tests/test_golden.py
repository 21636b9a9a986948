"""Golden layer: generated modules for the example models match the checked-in files, byte for byte."""
from pathlib import Path

import pytest

from hbpc.compiler import compile_source
from hbpc.export import load_model_file

ROOT = Path(__file__).resolve().parent.parent
MODELS = sorted((ROOT / "examples" / "models").glob("*.py"))
GOLDEN = ROOT / "examples" / "generated"


def _generate(model_file: Path) -> str:
    spec = load_model_file(model_file)
    return compile_source(spec.model, spec.example_input, spec.loss_fn, source_name=model_file.name)


@pytest.mark.parametrize("model_file", MODELS, ids=[m.stem for m in MODELS])
def test_generated_module_matches_golden_file(model_file, update_golden):
    text = _generate(model_file)
    golden = GOLDEN / model_file.name
    if update_golden:
        golden.write_text(text)
    assert golden.exists(), f"no golden file for {model_file.name}; run `make golden`"
    assert text == golden.read_text(), f"{golden} is stale; run `make golden` after an intended change"


def test_recompiling_is_byte_identical():
    model_file = ROOT / "examples" / "models" / "cnn_fashion_mnist.py"
    assert _generate(model_file) == _generate(model_file)


@pytest.mark.parametrize("model_file", MODELS, ids=[m.stem for m in MODELS])
def test_generated_module_imports_torch_and_the_runtime_only(model_file):
    imports = [line for line in (GOLDEN / model_file.name).read_text().splitlines()
               if line.startswith(("import ", "from "))]
    assert imports[0] == "import torch" and all(line.startswith("from hbpc.runtime import ") for line in imports[1:])


def test_the_paper_models_compile_to_short_modules():
    """The generated modules hold only what is specific to the model: the paper's FCNN in at most 300 lines,
    logistic regression in at most 120 (the checked-in files equal the compiler's output, as tested above)."""
    assert len((GOLDEN / "fcnn_cifar10.py").read_text().splitlines()) <= 300
    assert len((GOLDEN / "logreg_fashion_mnist.py").read_text().splitlines()) <= 120
