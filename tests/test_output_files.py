"""Writing generated modules: the mode a plain open gives, no partial output, special files and symlinks kept."""
import os
import socket
import stat
import threading
from pathlib import Path

import pytest

from hbpc.cli import main
from hbpc.compiler import write_atomically
from hbpc.errors import HbpcError

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "examples" / "models" / "logreg_fashion_mnist.py"


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_new_module_is_written_0644_under_umask_022(tmp_path, umask_022):
    out = tmp_path / "curv.py"
    assert main(["compile", str(MODEL), "-o", str(out), "--no-verify"]) == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o644


def test_new_file_follows_the_umask(tmp_path):
    previous = os.umask(0o077)
    try:
        write_atomically(tmp_path / "a.py", "x = 1\n")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "a.py").stat().st_mode) == 0o600


def test_replacing_a_file_keeps_its_mode(tmp_path, umask_022):
    out = tmp_path / "curv.py"
    out.write_text("old\n")
    out.chmod(0o664)
    write_atomically(out, "new\n")
    assert out.read_text() == "new\n" and stat.S_IMODE(out.stat().st_mode) == 0o664


def test_failed_compile_leaves_no_output_and_keeps_the_old_file(tmp_path, capsys):
    broken = tmp_path / "model.py"
    broken.write_text("import torch\nfrom torch import nn\nmodel = nn.Sequential(nn.Linear(3, 4), nn.Softmin(1))\n"
                      "example_input = torch.zeros(2, 3)\n")
    out = tmp_path / "curv.py"
    assert main(["compile", str(broken), "-o", str(out)]) == 2
    assert not out.exists()
    out.write_text("previous module\n")
    assert main(["compile", str(broken), "-o", str(out)]) == 2
    assert out.read_text() == "previous module\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curv.py", "model.py"]


def test_a_failing_write_removes_its_temporary_file(tmp_path, monkeypatch):
    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(HbpcError, match="No space left on device"):
        write_atomically(tmp_path / "curv.py", "x = 1\n")
    assert list(tmp_path.iterdir()) == []


def test_dev_null_stays_a_device(capsys):
    before = os.stat("/dev/null")
    assert main(["compile", str(MODEL), "-o", "/dev/null", "--no-verify"]) == 0
    after = os.stat("/dev/null")
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev


def test_a_pipe_is_written_into(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()))
    reader.start()
    write_atomically(fifo, "x = 1\n")
    reader.join(timeout=10)
    assert received == ["x = 1\n"] and stat.S_ISFIFO(fifo.stat().st_mode)


def test_a_socket_is_refused(tmp_path):
    path = tmp_path / "s"
    if len(str(path)) > 100:
        pytest.skip("socket path too long for AF_UNIX")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    try:
        with pytest.raises(HbpcError, match="is a special file"):
            write_atomically(path, "x = 1\n")
    finally:
        server.close()
    assert stat.S_ISSOCK(path.stat().st_mode)


def test_a_symlink_is_written_through_to_its_target(tmp_path):
    folder = tmp_path / "real"
    folder.mkdir()
    target = folder / "curv.py"
    target.write_text("old\n")
    link = tmp_path / "link.py"
    link.symlink_to(target)
    assert main(["compile", str(MODEL), "-o", str(link), "--no-verify"]) == 0
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert "class Curvature" in target.read_text()
    assert sorted(p.name for p in folder.iterdir()) == ["curv.py"]


def test_a_dangling_symlink_creates_its_target(tmp_path):
    link, target = tmp_path / "link.py", tmp_path / "target.py"
    link.symlink_to(target)
    write_atomically(link, "x = 1\n")
    assert link.is_symlink() and target.read_text() == "x = 1\n"


def test_a_folder_or_missing_folder_is_refused(tmp_path):
    with pytest.raises(HbpcError, match="is a folder"):
        write_atomically(tmp_path, "x = 1\n")
    with pytest.raises(HbpcError, match="does not exist"):
        write_atomically(tmp_path / "missing" / "curv.py", "x = 1\n")


def test_module_on_stdout_through_a_pipe_stays_clean(tmp_path):
    import subprocess
    import sys

    script = ("import sys; from hbpc.cli import main; "
              f"sys.exit(main(['compile', {str(MODEL)!r}, '-o', '/dev/stdout', '--no-verify']))")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    compile(run.stdout, "curv_model.py", "exec")  # the pipe got the module and nothing else
    assert "class Curvature" in run.stdout and "wrote /dev/stdout" in run.stderr
