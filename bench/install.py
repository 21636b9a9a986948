"""Install pyproject.toml extras (default: ``bench``) into the current environment, without replacing torch.

BackPACK and laplace-torch require torchvision, and every torchvision release pins one torch release:
a plain ``pip install '.[bench]'`` either replaces the installed torch or, pinned to it, brings a
torchvision built for another (CUDA) torch that fails on import. Nothing in the benchmark, nor
laplace-torch, imports torchvision, so the extras list BackPACK's, curvlinops' and laplace-torch's
other requirements explicitly and this script installs them with ``--no-deps``, then checks that torch
is the same as before. ``python bench/install.py bench laplace`` installs both; ``make bench`` and
``make test`` run it once per extra (stamp files ``.venv/.<extra>-installed``).
"""
import re
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def extra_requirements(extra):
    text = (ROOT / "pyproject.toml").read_text()
    try:
        import tomllib

        return tomllib.loads(text)["project"]["optional-dependencies"][extra]
    except ModuleNotFoundError:  # Python 3.10: each extra is one flat TOML array of strings
        block = re.search(rf"^{re.escape(extra)}\s*=\s*\[(.*?)\]", text, re.S | re.M).group(1)
        return re.findall(r'"([^"]+)"', block)


def torch_version():
    try:
        return version("torch")
    except PackageNotFoundError:
        return None


def main(extras):
    before = torch_version()
    requirements = sorted({r for extra in extras for r in extra_requirements(extra)})
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *requirements])
    after = torch_version()
    if after != before:
        raise SystemExit(f"installing the {'/'.join(extras)} extra changed torch from {before} to {after}")
    print(f"{'/'.join(extras)} extra installed ({len(requirements)} packages, --no-deps); torch {after} unchanged")


if __name__ == "__main__":
    main(sys.argv[1:] or ["bench"])
