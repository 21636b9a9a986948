"""Install pyproject.toml's ``bench`` extra into the current environment, without replacing torch.

BackPACK requires torchvision, and every torchvision release pins one torch release: a plain
``pip install '.[bench]'`` either replaces the installed torch or, pinned to it, brings a
torchvision built for another (CUDA) torch that fails on import. Nothing in the benchmark
imports torchvision, so the extra lists BackPACK's and curvlinops' other requirements
explicitly and this script installs them with ``--no-deps``, then checks that torch is the
same as before. ``make bench`` runs it once (stamp file ``.venv/.bench-installed``).
"""
import re
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bench_requirements():
    text = (ROOT / "pyproject.toml").read_text()
    try:
        import tomllib

        return tomllib.loads(text)["project"]["optional-dependencies"]["bench"]
    except ModuleNotFoundError:  # Python 3.10: the list is one flat TOML array of strings
        block = re.search(r"^bench\s*=\s*\[(.*?)\]", text, re.S | re.M).group(1)
        return re.findall(r'"([^"]+)"', block)


def torch_version():
    try:
        return version("torch")
    except PackageNotFoundError:
        return None


def main():
    before = torch_version()
    requirements = bench_requirements()
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *requirements])
    after = torch_version()
    if after != before:
        raise SystemExit(f"installing the bench extra changed torch from {before} to {after}")
    print(f"bench extra installed ({len(requirements)} packages, --no-deps); torch {after} unchanged")


if __name__ == "__main__":
    main()
