"""The paper's FCNN at N = 500: blocks stay structured and never form the first layer's input curvature."""
from pathlib import Path

import torch

from hbpc.compiler import import_generated
from hbpc.export import load_model_file

ROOT = Path(__file__).resolve().parent.parent


def test_fcnn_blocks_at_batch_500_are_kronecker_and_skip_first_input_curvature():
    spec = load_model_file(ROOT / "examples" / "models" / "fcnn_cifar10.py")
    module = import_generated(ROOT / "examples" / "generated" / "fcnn_cifar10.py")
    formed = []
    for helper in ("sandwich_independent", "elementwise_input_curvature"):
        if not hasattr(module, helper):  # the module imports from hbpc.runtime only the helpers it calls
            continue
        original = getattr(module, helper)

        def recording(*args, _original=original, **kwargs):
            result = _original(*args, **kwargs)
            formed.append(tuple(result.shape))
            return result

        setattr(module, helper, recording)
    curvature = module.Curvature(spec.model)
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(500, 3, 32, 32, generator=generator)
    curvature.forward_backward(x, torch.randint(10, (500,), generator=generator))
    blocks = curvature.blocks("pch-abs", average_input_jacobian=True, average_parameter_jacobian=False)
    assert max(formed) == (1024, 1024)  # S at the input of the second linear layer; never 3072 x 3072
    first = blocks["1.weight"]
    assert isinstance(first, module.KroneckerBlock)  # A ⊗ x̄x̄ᵀ-type factors, B kept as its thin root
    A, B = first.kronecker_factors
    assert A.shape == (1024, 1024) and B.shape == (3072, 3072)
    v = torch.randn(2, 1024, 3072)
    assert (first @ v).shape == v.shape
    for name, p in spec.model.named_parameters():
        assert blocks[name].shape == (p.numel(), p.numel())
