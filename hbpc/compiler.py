"""The pipeline end to end: export -> derive -> plan -> emit -> verify, and loading the result."""
import hashlib
import importlib.util
import itertools
import json
import os
import stat
import sys
import tempfile
import warnings
from pathlib import Path

from hbpc.derive import annotate
from hbpc.emit import emit
from hbpc.errors import HbpcError
from hbpc.export import export, graph_hash, load_rules_file
from hbpc.plan import QUANTITIES, plan, requested
from hbpc.rules import extended

ASSUMED_LOSS = ("no loss_fn given: hbpc assumes nn.CrossEntropyLoss() (mean reduction); define loss_fn in the model "
                "file or pass --loss (compile_model(..., loss_fn=...)) to choose another")
_RULES_HEADER = "# rules: "


def assumed_loss_notice(loss_fn, loss):
    """The notice to give when the loss is a silent default (cross-entropy), else None."""
    return ASSUMED_LOSS if loss_fn is None and loss is None else None


def rules_digest(path) -> str:
    """The first 16 hex digits of the rules file's SHA-256."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def rules_record(rules_path, output=None) -> str:
    """The header line recording a rules file: its path (relative to the output's folder when known) and digest."""
    rules_path = Path(rules_path).resolve()
    shown = str(rules_path)
    folder = Path(os.path.realpath(output)).parent if output is not None else None
    if folder is not None and os.path.commonpath([rules_path, folder]) != os.path.sep:
        shown = os.path.relpath(rules_path, folder)
    return f"{_RULES_HEADER}{json.dumps(shown)} sha256:{rules_digest(rules_path)}"


def recorded_rules(text: str, generated_path):
    """(path, digest) of the rules file a generated module records, resolved against its folder; else None."""
    for line in text.splitlines():
        if line.startswith(_RULES_HEADER):
            shown, _, digest = line[len(_RULES_HEADER):].rpartition(" sha256:")
            try:
                path = Path(json.loads(shown))
            except (ValueError, TypeError):
                return None  # an edited header: as if no rules file were recorded
            return (path if path.is_absolute() else Path(os.path.realpath(generated_path)).parent / path), digest
        if not line.startswith("#"):
            return None
    return None


def compiled_quantities(quantities) -> frozenset:
    """The requested quantities (names or "gradient,ggn"; None: all) or an HbpcError naming the unknown one."""
    try:
        return requested(quantities)
    except ValueError as error:
        raise HbpcError(str(error), "quantities= / hbpc compile --for",
                        f"pass some of {', '.join(QUANTITIES)}, e.g. --for gradient,ggn") from None


def compile_graph(model, example_input, loss_fn=None, loss=None, source_name="<model>", rules=(), header_lines=(),
                  quantities=None):
    """(IR graph, text of the generated module); ``rules`` adds user rules to the table; the module computes only
    ``quantities`` (hbpc.plan.QUANTITIES; default all) and caches only what they read."""
    quantities = compiled_quantities(quantities)
    with extended(list(rules)):
        graph = annotate(export(model, example_input, loss_fn, loss))
        note = ("The loss is the default: the model gave no loss_fn, so hbpc assumed nn.CrossEntropyLoss()."
                if assumed_loss_notice(loss_fn, loss) else None)
        text = emit(graph, plan(graph, quantities=quantities), source_name, graph_hash(graph), header_lines, note)
    return graph, text


def compile_source(model, example_input, loss_fn=None, loss=None, source_name="<model>", rules=(),
                   quantities=None) -> str:
    """The text of the generated module for ``model`` (not verified); ``rules`` adds user rules to the table."""
    return compile_graph(model, example_input, loss_fn, loss, source_name, rules, quantities=quantities)[1]


_IMPORTS = itertools.count()


def verified_module(graph, text, model, example_input, loss_fn=None, loss=None, rules=(), verify=True):
    """Import ``text`` from a temporary file and, if ``verify``, check it against autograd (hbpc.verify).

    Returns the imported module; raises HbpcError naming the quantity and the rule if it is wrong or broken.
    """
    from hbpc.verify import import_checked, verify as check

    name = f"hbpc_generated_{hashlib.sha256(text.encode()).hexdigest()[:16]}_{next(_IMPORTS)}"
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "curv_model.py"
        path.write_text(text)
        module = import_checked(graph, text, path, lambda p: import_generated(p, name=name))
        if verify:
            try:
                check(graph, module, model, example_input, loss_fn, loss, rules)
            except BaseException:
                sys.modules.pop(name, None)
                raise
    return module


def _new_file_mode() -> int:
    """0o666 minus the umask: the mode ``open(path, "w")`` gives a new file."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _write_into(path: Path, text: str):
    """Write into an existing special file (``/dev/null``, a pipe) as ``open(path, "w")`` would."""
    try:
        with open(path, "w") as handle:
            handle.write(text)
    except OSError as error:
        raise HbpcError(f"cannot write {path}: {error.strerror}", str(path), "choose a writable output path") from None


def write_atomically(path, text: str):
    """Write ``text`` to ``path`` so that no half-written file remains, with the mode a plain open would give.

    A regular file (or a new one) is replaced via a temporary file in its folder, keeping an existing file's
    mode (new files: 0o666 minus the umask). A symlink is written through: its target is replaced, never the
    link. A character device or a pipe (``/dev/null``, ``/dev/stdout``) is written into directly; other special
    files (sockets, block devices) are refused.
    """
    path = Path(path)
    try:
        info = os.stat(path)  # follows symlinks
    except FileNotFoundError:
        info = None
    except OSError as error:
        raise HbpcError(f"cannot write {path}: {error.strerror}", str(path), "choose a writable output path") from None
    if info is not None and stat.S_ISDIR(info.st_mode):
        raise HbpcError(f"output path {path} is a folder", str(path), "pass a file name, e.g. -o curv_model.py")
    if info is not None and (stat.S_ISCHR(info.st_mode) or stat.S_ISFIFO(info.st_mode)):
        return _write_into(path, text)
    if info is not None and not stat.S_ISREG(info.st_mode):
        raise HbpcError(f"output path {path} is a special file (not a regular file, device or pipe)", str(path),
                        "pass a regular file name, e.g. -o curv_model.py")
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    if not target.parent.is_dir():
        raise HbpcError(f"output folder {target.parent} does not exist", str(path),
                        "create the folder or pick another -o")
    mode = stat.S_IMODE(info.st_mode) if info is not None else _new_file_mode()
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as error:
        raise HbpcError(f"cannot write {path}: {error.strerror}", str(path), "choose a writable output path") from None
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, target)
    except OSError as error:
        Path(tmp).unlink(missing_ok=True)
        raise HbpcError(f"cannot write {path}: {error.strerror}", str(path), "choose a writable output path") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def import_generated(path, name=None):
    """Import a generated module from ``path`` (registered in ``sys.modules`` under ``name``)."""
    name = name or f"hbpc_generated_{Path(path).stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def load_generated(path, name=None):
    """Import a module written by ``hbpc compile`` from its path, without touching ``sys.path``.

    >>> curv_model = hbpc.load_generated("curv_model.py")   # doctest: +SKIP
    >>> curvature = curv_model.Curvature(model)             # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise HbpcError(f"generated module {path} does not exist", str(path),
                        "pass the path given to hbpc compile -o")
    return import_generated(path, name)


def compile_model(model, example_input, loss_fn=None, path=None, loss=None, rules=(), verify=True, quantities=None):
    """Compile ``model`` and return the imported generated module (also written to ``path`` if given).

    ``rules`` is a list of extra rules, or the path of a rules file (as ``hbpc compile --rules``).
    ``verify`` runs the module once in float64 against autograd on ``model`` before returning or writing it
    (hbpc.verify) and raises HbpcError if they disagree; ``verify=False`` skips that check.
    Without ``loss_fn`` and ``loss`` the loss is cross-entropy; a warning says so.
    ``quantities`` (e.g. ``("gradient", "ggn")``; default all of hbpc.plan.QUANTITIES) limits what the module
    computes: forward_backward caches only what they read, and asking for another quantity raises ValueError.
    """
    header = ()
    if isinstance(rules, (str, os.PathLike)):
        rules, header = load_rules_file(rules), (rules_record(rules, path),)
    rules = list(rules)
    graph, text = compile_graph(model, example_input, loss_fn, loss, type(model).__name__, rules, header, quantities)
    module = verified_module(graph, text, model, example_input, loss_fn, loss, rules, verify)
    if path is not None:
        sys.modules.pop(module.__name__, None)
        write_atomically(path, text)
        module = import_generated(path)
    if assumed_loss_notice(loss_fn, loss):
        warnings.warn(assumed_loss_notice(loss_fn, loss), stacklevel=2)
    return module
