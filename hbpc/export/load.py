"""Read a model file: ``model`` or ``build_model()``, ``example_input``, optional ``loss_fn``."""
import runpy
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hbpc.errors import HbpcError


@dataclass
class ModelSpec:
    model: nn.Module
    example_input: torch.Tensor
    loss_fn: nn.Module
    path: str


def _last_user_frame(error: BaseException, path: str) -> str:
    frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename == path]
    return f"{path}:{frames[-1].lineno}" if frames else path


def _run_file(path, what: str, expected: str) -> tuple:
    """(resolved path, namespace) of a user's Python file, with its failures as one clear error."""
    path = str(Path(path).resolve())
    if not Path(path).is_file():
        raise HbpcError(f"{what} file {path} does not exist", fix=f"pass the path of a Python file defining {expected}")
    try:
        return path, runpy.run_path(path, run_name=f"hbpc_{what}")
    except SyntaxError as error:
        raise HbpcError(f"{what} file has a syntax error: {error.msg}", f"{path}:{error.lineno}",
                        "fix the Python syntax") from None
    except Exception as error:  # the user's file may raise anything
        raise HbpcError(f"{what} file raised {type(error).__name__}: {error}", _last_user_frame(error, path),
                        f"make the {what} file importable on its own") from None


def load_model_file(path) -> ModelSpec:
    """Execute ``path`` in a fresh namespace and check it follows the model.py contract."""
    path, namespace = _run_file(path, "model", "`model`")
    model = namespace.get("model")
    if model is None and callable(namespace.get("build_model")):
        try:
            model = namespace["build_model"]()
        except Exception as error:
            raise HbpcError(f"build_model() raised {type(error).__name__}: {error}", _last_user_frame(error, path),
                            "make build_model() return an nn.Module") from None
    if not isinstance(model, nn.Module):
        found = "nothing" if model is None else type(model).__name__
        raise HbpcError(f"model file defines no `model` nn.Module (found {found})", path,
                        "define `model = ...` (an nn.Module) or `def build_model(): return ...`")
    example = namespace.get("example_input")
    if not isinstance(example, torch.Tensor):
        found = "nothing" if example is None else type(example).__name__
        raise HbpcError(f"model file defines no `example_input` tensor (found {found})", path,
                        "define `example_input = torch.zeros(N, ...)` with the batch as first dimension")
    loss_fn = namespace.get("loss_fn")
    if loss_fn is not None and not isinstance(loss_fn, nn.Module):
        raise HbpcError(f"`loss_fn` must be an nn.Module such as nn.CrossEntropyLoss(), got {type(loss_fn).__name__}",
                        path, "set `loss_fn = nn.CrossEntropyLoss()` or `nn.MSELoss()`, or remove it")
    return ModelSpec(model, example, loss_fn, path)


def load_model(path) -> tuple:
    """``(model, example_input, loss_fn)`` of a model file, as ``hbpc compile`` reads it.

    ``loss_fn`` is the file's, or ``nn.CrossEntropyLoss()`` (what the compiler assumes) if it defines none.

    >>> model, example_input, loss_fn = hbpc.load_model("examples/models/mlp_fashion_mnist.py")  # doctest: +SKIP
    """
    spec = load_model_file(path)
    return spec.model, spec.example_input, spec.loss_fn if spec.loss_fn is not None else nn.CrossEntropyLoss()


def load_rules_file(path) -> list:
    """User rules: every rule object a Python file defines at module level (e.g. in a ``RULES`` list)."""
    from hbpc.rules.spec import Elementwise, Loss, Normalization, Selection, Structured

    kinds = (Elementwise, Loss, Normalization, Selection, Structured)
    path, namespace = _run_file(path, "rules", "rules, e.g. RULES = [...]")
    found = [value for value in namespace.values() if isinstance(value, kinds)]
    found += [rule for value in namespace.values() if isinstance(value, (list, tuple))
              for rule in value if isinstance(rule, kinds)]
    unique = list({id(rule): rule for rule in found}.values())
    from hbpc.rules import SELECTIONS

    primitives = sorted({rule.primitive for rule in SELECTIONS})
    for rule in unique:
        if isinstance(rule, Selection) and rule.primitive not in primitives:
            raise HbpcError(f"selection rule '{rule.key}' names the primitive '{rule.primitive}', which the generated "
                            "module has no helpers for", path,
                            f"use one of the built-in primitives: {', '.join(primitives)}")
    if not unique:
        raise HbpcError("rules file defines no rules", path,
                        "define e.g. RULES = [Elementwise('swish', x / (1 + exp(-x)))] with hbpc.rules.spec")
    return unique
