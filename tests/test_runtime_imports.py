"""The runtime (``hbpc.optim``, ``hbpc.linalg``, ``hbpc.data``) must load without the compiler or its dependencies."""

import subprocess
import sys

COMPILER = ("hbpc.compiler", "hbpc.export", "hbpc.derive", "hbpc.plan", "hbpc.emit", "hbpc.rules", "sympy", "networkx")


def test_runtime_does_not_import_compiler():
    code = (
        "import sys, hbpc.optim, hbpc.linalg, hbpc.data\n"
        f"print(','.join(m for m in {COMPILER!r} if m in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "", f"importing the runtime loaded {loaded}"
