"""The native kernels' SIMD paths against the same sums in double, torch left out (tests/native/simd_check.cpp):
this CPU's path (AVX2 here) and the plain C++ one, natively; the ARM NEON (dot product) path built with a cross
compiler and run under qemu-user, where the Debian packages g++-aarch64-linux-gnu and qemu-user are installed
(.ci/run installs them when it can; without them that test skips and says so). The NEON path keeps the plain
path's order of float operations, so its results must also equal the plain ARM build's bit for bit."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "tests" / "native" / "simd_check.cpp"


def build_and_run(tmp_path: Path, name: str, compiler: list[str], flags: list[str], runner: list[str]) -> list[str]:
    exe = tmp_path / name
    subprocess.run([*compiler, "-O2", "-std=c++17", *flags, str(SOURCE), "-o", str(exe)], check=True,
                   capture_output=True, text=True, timeout=600)
    p = subprocess.run([*runner, str(exe)], capture_output=True, text=True, timeout=600)
    lines = p.stdout.splitlines()
    assert p.returncode == 0 and lines[-1] == "ok", "\n".join(line for line in lines if "FAIL" in line)[:2000]
    return lines


@pytest.mark.parametrize("path", ["native", "generic"])
def test_kernels_on_this_cpu(tmp_path, path):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler (the native kernels are not built here either)")
    flags = ["-march=native"] if path == "native" else []
    lines = build_and_run(tmp_path, path, [cxx], flags, [])
    assert len(lines) > 300
    if path == "generic":
        assert lines[0] == "simd generic"


def test_neon_kernels_under_qemu(tmp_path):
    cross, qemu = shutil.which("aarch64-linux-gnu-g++"), shutil.which("qemu-aarch64")
    if cross is None or qemu is None:
        pytest.skip("the ARM NEON path needs g++-aarch64-linux-gnu and qemu-user (Debian packages) to be checked here")
    neon = build_and_run(tmp_path, "neon", [cross], ["-march=armv8.2-a+dotprod", "-static"], [qemu])
    plain = build_and_run(tmp_path, "plain", [cross], ["-march=armv8-a", "-static"], [qemu])
    assert neon[0] == "simd neon+dotprod" and plain[0] == "simd generic"
    assert neon[1:] == plain[1:]  # every result, as hex floats
