"""The pipeline end to end: export -> derive -> plan -> emit, and loading the result."""
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

from hbpc.emit import emit
from hbpc.errors import HbpcError
from hbpc.export import export, graph_hash, load_rules_file
from hbpc.plan import plan
from hbpc.rules import extended


def compile_source(model, example_input, loss_fn=None, loss=None, source_name="<model>", rules=()) -> str:
    """The text of the generated module for ``model``; ``rules`` adds user rules to the table."""
    with extended(list(rules)):
        graph = export(model, example_input, loss_fn, loss)
        return emit(graph, plan(graph), source_name, graph_hash(graph))


def write_atomically(path, text: str):
    """Write ``text`` to ``path`` via a temporary file in the same folder, so no half-written file remains."""
    path = Path(path)
    if not path.parent.is_dir():
        raise HbpcError(f"output folder {path.parent} does not exist", str(path), "create the folder or pick another -o")
    if path.is_dir():
        raise HbpcError(f"output path {path} is a folder", str(path), "pass a file name, e.g. -o curv_model.py")
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise HbpcError(f"cannot write {path}: {error.strerror}", str(path), "choose a writable output path") from None
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except OSError as error:
        Path(tmp).unlink(missing_ok=True)
        raise HbpcError(f"cannot write {path}: {error.strerror}", str(path), "choose a writable output path") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def import_generated(path, name=None):
    """Import a generated module from ``path``."""
    name = name or f"hbpc_generated_{Path(path).stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def compile_model(model, example_input, loss_fn=None, path=None, loss=None, rules=()):
    """Compile ``model`` and return the imported generated module (also written to ``path`` if given).

    ``rules`` is a list of extra rules, or the path of a rules file (as ``hbpc compile --rules``).
    """
    if isinstance(rules, (str, os.PathLike)):
        rules = load_rules_file(rules)
    text = compile_source(model, example_input, loss_fn, loss, source_name=type(model).__name__, rules=rules)
    if path is not None:
        write_atomically(path, text)
        return import_generated(path)
    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / "curv_model.py"
        target.write_text(text)
        return import_generated(target, name=f"hbpc_generated_{abs(hash(text))}")
