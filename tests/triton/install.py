"""A real ``tritonserver`` for the tests, taken from the ``nvidia-pytriton`` wheel on PyPI.

The wheel (about 55 MB) ships Triton 2.51 with its python backend, the libraries it needs
(found through the binaries' RPATH) and one python-backend stub per Python version. It is
downloaded with ``pip download`` (never installed: its requirements would downgrade
protobuf), unpacked once into ``$PROTOSERVE_TRITON_HOME`` (default ``<repo>/.venv/tritonserver``,
git-ignored, removed with the venv) and reused by later runs.

    python -m tests.triton.install     # fetch now; prints the binary's path
"""

from __future__ import annotations

import fcntl
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PYTRITON_VERSION = "0.7.0"
REPO_ROOT = Path(__file__).resolve().parents[2]
_DONE = ".complete"


class TritonUnavailable(RuntimeError):
    """tritonserver cannot be fetched or unpacked on this machine."""


def triton_home() -> Path:
    home = os.environ.get("PROTOSERVE_TRITON_HOME")
    return Path(home) if home else REPO_ROOT / ".venv" / "tritonserver"


def install_dir() -> Path:
    return triton_home() / f"nvidia-pytriton-{PYTRITON_VERSION}"


def server_root(root: Path) -> Path:
    """``.../pytriton/tritonserver`` inside an unpacked wheel."""
    return root / "pytriton" / "tritonserver"


def _python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def _download(dest: Path) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
        "--only-binary=:all:", "--disable-pip-version-check",
        f"nvidia-pytriton=={PYTRITON_VERSION}", "-d", str(dest),
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise TritonUnavailable(f"pip download nvidia-pytriton=={PYTRITON_VERSION}: {e}") from e
    wheels = sorted(dest.glob("nvidia_pytriton-*.whl"))
    if proc.returncode != 0 or not wheels:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        tail = "\n".join([ln for ln in lines if not ln.startswith("WARNING:")][-4:])
        raise TritonUnavailable(
            f"cannot download nvidia-pytriton=={PYTRITON_VERSION} with pip "
            f"(exit {proc.returncode}): {tail or 'no wheel for this platform'}"
        )
    return wheels[0]


def _unpack(wheel: Path, dest: Path) -> None:
    """Unzips the server and its libraries, keeping the files' permission bits."""
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            if not info.filename.startswith(("pytriton/tritonserver/", "nvidia_pytriton.libs/")):
                continue
            path = Path(zf.extract(info, dest))
            mode = (info.external_attr >> 16) & 0o777
            if mode and not info.is_dir():
                path.chmod(mode)


def _add_stub(root: Path) -> None:
    """The python backend runs ``backends/python/triton_python_backend_stub``, built per
    Python version; it must match the Python whose packages the models import."""
    stubs = server_root(root) / "python_backend_stubs"
    stub = stubs / _python_version() / "triton_python_backend_stub"
    if not stub.is_file():
        have = sorted(p.name for p in stubs.iterdir()) if stubs.is_dir() else []
        raise TritonUnavailable(
            f"nvidia-pytriton {PYTRITON_VERSION} has no python backend stub for Python "
            f"{_python_version()} (it has {', '.join(have) or 'none'})"
        )
    target = server_root(root) / "backends" / "python" / stub.name
    shutil.copy2(stub, target)
    for exe in (target, server_root(root) / "bin" / "tritonserver"):
        exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def ensure_tritonserver() -> Path:
    """The ``tritonserver`` binary, fetched and unpacked on first use.

    Raises ``TritonUnavailable`` (with pip's reason) when it cannot be fetched.
    """
    root = install_dir()
    binary = server_root(root) / "bin" / "tritonserver"
    if (root / _DONE).is_file() and binary.is_file():
        return binary
    if not sys.platform.startswith("linux"):
        raise TritonUnavailable(
            f"tritonserver from nvidia-pytriton needs Linux, not {sys.platform}"
        )
    home = triton_home()
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one installer at a time
        if (root / _DONE).is_file() and binary.is_file():
            return binary
        with tempfile.TemporaryDirectory(dir=home, prefix=".fetch-") as tmp:
            staging = Path(tmp) / "unpacked"
            _unpack(_download(Path(tmp)), staging)
            _add_stub(staging)
            shutil.rmtree(root, ignore_errors=True)
            staging.rename(root)
        (root / _DONE).write_text(f"nvidia-pytriton {PYTRITON_VERSION}\n")
    return binary


def backends_dir(binary: Path) -> Path:
    return binary.parent.parent / "backends"


if __name__ == "__main__":
    print(ensure_tritonserver())
