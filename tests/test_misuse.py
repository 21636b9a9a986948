"""Bad-usage corpus: ordinary mistakes with a generated module and the optimizers.

Each case gets one clear error of the stated type whose message names the argument at fault (and, for values,
what was expected and what was passed), never a traceback from deep inside torch or a silently wrong number.
State errors (a stale cache, a model in training mode) are ``RuntimeError``s naming what changed.
"""
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hbpc
from hbpc.optim import KFAC, NewtonCG

F64 = dict(dtype=torch.float64)
N, C = 6, 3
_MODULES = {}


def _compiled(key, build, x, loss_fn):
    if key not in _MODULES:
        _MODULES[key] = hbpc.compile_model(build(), x, loss_fn)
    return _MODULES[key]


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, C)).double()


class FunctionalDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, C)

    def forward(self, x):
        return self.fc2(F.dropout(torch.tanh(self.fc1(x)), 0.5, training=self.training))


@dataclass
class Env:
    """A bound module after forward_backward on (x, y), its model and vectors shaped like the parameters."""

    module: object
    model: nn.Module
    curvature: object
    x: torch.Tensor
    y: torch.Tensor
    vs: list


def _env(loss="ce", build=_mlp, key=None):
    x = torch.randn(N, 4, **F64)
    loss_fn = nn.CrossEntropyLoss() if loss == "ce" else nn.MSELoss()
    module = _compiled(key or loss, build, x, loss_fn)
    model = build()
    curvature = module.Curvature(model)
    y = torch.randint(C, (N,)) if loss == "ce" else torch.randn(N, C, **F64)
    curvature.forward_backward(x, y)
    return Env(module, model, curvature, x, y, [torch.randn_like(p) for p in model.parameters()])


def _eval_model(layer):
    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 5), layer(), nn.Tanh(), nn.Linear(5, C)).double().eval()
    return build


def _functional_dropout():
    torch.manual_seed(0)
    return FunctionalDropout().double().eval()


def _step(env):
    with torch.no_grad():
        for p in env.model.parameters():
            p.add_(0.01)


def _newton_step_after_backward(env):
    curvature = env.module.Curvature(env.model)  # bound, but forward_backward never ran
    F.cross_entropy(env.model(env.x), env.y).backward()  # plain autograd instead of forward_backward
    NewtonCG(env.model.parameters(), curvature).step()


def _newton_two_steps(env):
    optimizer = NewtonCG(env.model.parameters(), env.curvature)
    optimizer.step()
    optimizer.step()  # the parameters moved; forward_backward was not called again


def _kfac_step_after_backward(env):
    curvature = env.module.Curvature(env.model)  # bound, but forward_backward never ran
    F.cross_entropy(env.model(env.x), env.y).backward()
    KFAC(env.model.parameters(), curvature).step()


def _replace_parameter(env):
    env.model[0].weight = nn.Parameter(env.model[0].weight.detach().clone())
    env.curvature.hessian_vector_product(env.vs)


def _replace_with_wrong_shape(env):
    env.model[0].weight = nn.Parameter(torch.zeros(5, 3, **F64))
    env.curvature.forward_backward(env.x, env.y)


def _mixed_parameter_dtypes(env):
    env.model[2].float()
    env.curvature.forward_backward(env.x, env.y)


def _train_mode(build, key):
    def case(_):
        env = _env(build=build, key=key)
        env.model.train()
        env.curvature.forward_backward(env.x, env.y)
    return case


# id: (misuse, exception type, substrings the message must contain)
CASES = {
    # binding
    "model-not-a-module": (lambda e: e.module.Curvature("model.pt"), TypeError, ["model", "nn.Module", "str"]),
    "model-of-another-architecture": (lambda e: e.module.Curvature(nn.Linear(4, 3).double()), ValueError,
                                      ["model does not match", "missing"]),
    "parameter-replaced-by-wrong-shape": (_replace_with_wrong_shape, ValueError, ["model", "wrong shape", "0.weight"]),
    "parameters-of-mixed-dtypes": (_mixed_parameter_dtypes, TypeError, ["model parameters", "float32", "float64"]),
    # x
    "x-not-a-tensor": (lambda e: e.curvature.forward_backward(e.x.tolist(), e.y), TypeError, ["x", "list"]),
    "x-wrong-per-sample-shape": (lambda e: e.curvature.forward_backward(e.x[:, :3], e.y), ValueError,
                                 ["x", "(N, *(4,))", "(3,)"]),
    "x-without-batch-dimension": (lambda e: e.curvature.forward_backward(e.x[0], e.y), ValueError, ["x", "(4,)"]),
    "x-empty-batch": (lambda e: e.curvature.forward_backward(e.x[:0], e.y[:0]), ValueError, ["x", "N >= 1"]),
    "x-float32-params-float64": (lambda e: e.curvature.forward_backward(e.x.float(), e.y), TypeError,
                                 ["x", "torch.float64", "torch.float32"]),
    "x-with-nan": (lambda e: e.curvature.forward_backward(e.x.fill_(float("nan")), e.y), ValueError, ["x", "NaN"]),
    # class targets
    "target-batch-size-differs": (lambda e: e.curvature.forward_backward(e.x, e.y[:4]), ValueError,
                                  ["target", "(N,) = (6,)", "shape (4,)"]),
    "ce-labels-of-length-one-broadcast": (lambda e: e.curvature.forward_backward(e.x, e.y[:1]), ValueError,
                                          ["target", "(N,) = (6,)", "shape (1,)"]),
    "ce-label-out-of-range": (lambda e: e.curvature.forward_backward(e.x, torch.arange(N) % C + 1), ValueError,
                              ["target", "[0, 2]", "from 1 to 3"]),
    "ce-ignore-index-label": (lambda e: e.curvature.forward_backward(e.x, torch.full((N,), -100)), ValueError,
                              ["target", "[0, 2]", "-100"]),
    "ce-float-labels": (lambda e: e.curvature.forward_backward(e.x, e.y.double()), TypeError,
                        ["target", "integer dtype", "torch.float64"]),
    "ce-bool-labels": (lambda e: e.curvature.forward_backward(e.x, e.y > 0), TypeError, ["target", "torch.bool"]),
    "ce-probabilities-not-summing-to-one": (
        lambda e: e.curvature.forward_backward(e.x, torch.rand(N, C, **F64) + 1), ValueError,
        ["target", "class probabilities", "sum to 1"]),
    "ce-probabilities-of-wrong-width": (lambda e: e.curvature.forward_backward(e.x, torch.full((N, C + 1), 0.25, **F64)),
                                        TypeError, ["target", "(N, C) = (6, 3)", "(6, 4)"]),
    "target-not-a-tensor": (lambda e: e.curvature.forward_backward(e.x, e.y.tolist()), TypeError, ["target", "list"]),
    # dense targets
    "mse-target-(N,)-for-(N,C)-output": (lambda e: e.curvature.forward_backward(e.x, e.y[:, 0]), ValueError,
                                         ["target", "(6, 3)", "shape (6,)"], "mse"),
    "mse-target-batch-size-differs": (lambda e: e.curvature.forward_backward(e.x, e.y[:1]), ValueError,
                                      ["target", "(6, 3)", "shape (1, 3)"], "mse"),
    # vectors of the full products
    "vs-dict-instead-of-list": (lambda e: e.curvature.hessian_vector_product(dict(e.model.named_parameters())),
                                TypeError, ["vs", "list of 4 tensors", "list(vs.values())", "dict"]),
    "vs-one-tensor": (lambda e: e.curvature.ggn_vector_product(e.vs[0]), TypeError, ["vs", "list", "tensor"]),
    "vs-too-few": (lambda e: e.curvature.ggn_vector_product(e.vs[:3]), ValueError, ["vs", "4 tensors", "got 3"]),
    "vs-transposed": (lambda e: e.curvature.ggn_vector_product([e.vs[0].T, *e.vs[1:]]), ValueError,
                      ["vs[0] (0.weight)", "(5, 4)", "(4, 5)"]),
    "vs-flattened": (lambda e: e.curvature.hessian_vector_product([v.flatten() for v in e.vs]), ValueError,
                     ["vs[0] (0.weight)", "(5, 4)", "(20,)"]),
    "vs-float32": (lambda e: e.curvature.hessian_vector_product([v.float() for v in e.vs]), TypeError,
                   ["vs[0] (0.weight)", "torch.float64", "torch.float32"]),
    "vs-mixing-single-and-batched": (lambda e: e.curvature.ggn_vector_product([e.vs[0][None], *e.vs[1:]]), ValueError,
                                     ["vs", "all single", "(1, 5, 4)"]),
    "vs-batched-with-different-V": (lambda e: e.curvature.ggn_vector_product(
        [v.expand(2 + (i == 0), *v.shape) for i, v in enumerate(e.vs)]), ValueError, ["vs", "one V", "(3, 5, 4)"]),
    # blocks and block products
    "block-times-flattened-v": (lambda e: e.curvature.blocks()["0.weight"] @ e.vs[0].flatten(), ValueError,
                                ["v", "(5, 4)", "(20,)"]),
    "block-times-transposed-v": (lambda e: e.curvature.blocks("pch-abs")["0.weight"] @ e.vs[0].T, ValueError,
                                 ["v", "(5, 4)", "(4, 5)"]),
    "block-times-float32-v": (lambda e: e.curvature.blocks()["0.bias"] @ e.vs[1].float(), TypeError,
                              ["v", "torch.float64", "torch.float32"]),
    "block-solve-transposed-rhs": (lambda e: e.curvature.blocks()["0.weight"].solve(e.vs[0].T, 0.1), ValueError,
                                   ["rhs", "(5, 4)", "(4, 5)"]),
    "block-solve-negative-damping": (lambda e: e.curvature.blocks()["0.weight"].solve(e.vs[0], -1.0), ValueError,
                                     ["damping", ">= 0", "-1.0"]),
    "split-block-solve-flattened-rhs": (lambda e: e.curvature.blocks(split=2)["0.weight"].solve(e.vs[0].flatten(), 1.0),
                                        ValueError, ["rhs", "(5, 4)", "(20,)"]),
    "block-product-transposed-v": (lambda e: e.curvature.block_products("hessian")["0.weight"](e.vs[0].T), ValueError,
                                   ["v", "(5, 4)", "(4, 5)"]),
    "block-product-float32-v": (lambda e: e.curvature.block_products()["2.bias"](e.vs[3].float()), TypeError,
                                ["v", "torch.float64", "torch.float32"]),
    "split-block-product-flattened-v": (lambda e: e.curvature.block_products(split=2)["0.weight"](e.vs[0].flatten()),
                                        ValueError, ["v", "(5, 4)", "(20,)"]),
    "blocks-unknown-curvature": (lambda e: e.curvature.blocks("fisher"), ValueError, ["curvature", "'fisher'"]),
    "block-products-unknown-curvature": (lambda e: e.curvature.block_products("GGN"), ValueError,
                                         ["curvature", "'GGN'"]),
    "blocks-split-passed-positionally": (lambda e: e.curvature.blocks("ggn", 2), TypeError,
                                         ["average_input_jacobian", "bool", "2", "split"]),
    "blocks-split-zero": (lambda e: e.curvature.blocks(split=0), ValueError, ["split", "0"]),
    "kronecker-unknown-kind": (lambda e: e.curvature.kronecker_factors("kfc"), ValueError, ["kind", "'kfc'"]),
    "kronecker-zero-samples": (lambda e: e.curvature.kronecker_factors("kfac", samples=0), ValueError,
                               ["samples", "0"]),
    "fisher-zero-samples": (lambda e: e.curvature.fisher_mc_vector_product(e.vs, samples=0), ValueError,
                            ["samples", "0"]),
    # state
    "products-before-forward-backward": (lambda e: e.module.Curvature(e.model).ggn_vector_product(e.vs), RuntimeError,
                                         ["forward_backward(x, target)"]),
    "products-after-parameters-moved": (lambda e: (_step(e), e.curvature.hessian_vector_product(e.vs)), RuntimeError,
                                        ["0.weight", "changed in place", "forward_backward"]),
    "block-products-after-parameters-moved": (
        lambda e: (products := e.curvature.block_products(), _step(e), products["2.weight"](e.vs[2])), RuntimeError,
        ["0.weight", "changed in place", "forward_backward"]),
    "products-after-parameter-replaced": (_replace_parameter, RuntimeError, ["0.weight", "replaced", "forward_backward"]),
    "products-after-submodule-replaced": (
        lambda e: (e.model.__setitem__(2, nn.Linear(5, C).double()), e.curvature.ggn_vector_product(e.vs)),
        RuntimeError, ["submodule 2", "replaced", "forward_backward"]),
    "products-after-x-changed-in-place": (lambda e: (e.x.mul_(2), e.curvature.blocks()), RuntimeError,
                                          ["x", "changed in place", "forward_backward"]),
    "train-mode-with-dropout": (_train_mode(_eval_model(lambda: nn.Dropout(0.5)), "dropout"), RuntimeError,
                                ["model", "training mode", "1", "model.eval()"]),
    "train-mode-with-batchnorm": (_train_mode(_eval_model(lambda: nn.BatchNorm1d(5)), "batchnorm"), RuntimeError,
                                  ["model", "training mode", "1", "model.eval()"]),
    "train-mode-with-functional-dropout": (_train_mode(_functional_dropout, "functional-dropout"), RuntimeError,
                                           ["model", "training mode", "model.eval()"]),
    # optimizers
    "newton-cg-unknown-curvature": (lambda e: NewtonCG(e.model.parameters(), e.curvature,
                                                       curvature="fisher"),
                                    ValueError, ["curvature", "'fisher'"]),
    "newton-cg-negative-lr": (lambda e: NewtonCG(e.model.parameters(), e.curvature, lr=-0.1), ValueError,
                              ["lr", "-0.1"]),
    "newton-cg-unknown-solver": (lambda e: NewtonCG(e.model.parameters(), e.curvature, solver="qr"), ValueError,
                                 ["solver", "'qr'"]),
    "newton-cg-split-zero": (lambda e: NewtonCG(e.model.parameters(), e.curvature, split=0), ValueError,
                             ["split", "0"]),
    "newton-cg-params-of-another-model": (lambda e: NewtonCG(_mlp().parameters(), e.curvature), ValueError,
                                          ["params", "curvature.model"]),
    "newton-cg-model-as-curvature": (lambda e: NewtonCG(e.model.parameters(), e.model), TypeError,
                                     ["curvature", "Curvature", "Sequential"]),
    "newton-cg-step-after-plain-backward": (_newton_step_after_backward, RuntimeError, ["forward_backward"]),
    "newton-cg-second-step-without-forward-backward": (_newton_two_steps, RuntimeError,
                                                       ["changed in place", "forward_backward"]),
    "kfac-unknown-kind": (lambda e: KFAC(e.model.parameters(), e.curvature, kind="fisher"), ValueError,
                          ["kind", "'fisher'"]),
    "kfac-negative-lr": (lambda e: KFAC(e.model.parameters(), e.curvature, lr=-1.0), ValueError, ["lr", "-1.0"]),
    "kfac-zero-damping": (lambda e: KFAC(e.model.parameters(), e.curvature, damping=0), ValueError, ["damping", "0"]),
    "kfac-params-of-another-model": (lambda e: KFAC(_mlp().parameters(), e.curvature), ValueError, ["params"]),
    "kfac-model-as-curvature": (lambda e: KFAC(e.model.parameters(), e.model), TypeError, ["curvature", "Sequential"]),
    "kfac-step-after-plain-backward": (_kfac_step_after_backward, RuntimeError, ["forward_backward"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_misuse_gets_a_clear_error(name):
    misuse, error, words, *loss = CASES[name]
    env = _env(*loss)
    with pytest.raises(error) as raised:
        misuse(env)
    message = str(raised.value)
    missing = [word for word in words if word not in message]
    assert not missing, f"message lacks {missing}: {message}"
    assert raised.type is error, f"{raised.type.__name__} is a subclass of {error.__name__}: {message}"


def test_corpus_is_large_enough():
    assert len(CASES) >= 25
