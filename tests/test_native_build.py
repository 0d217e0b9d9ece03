"""The C++/CUDA sources build wherever a CUDA compiler is, with or without a GPU.

CMake builds the kernels library (every csrc/*.cu for sm_80 and sm_90, the CPU kernels) and the
standalone CUDA tests and benchmarks; the extension's bindings, which setup.py compiles with their
CUDA parts only against a CUDA build of torch, are compiled here with those parts switched on. Nothing
CUDA runs here: .ci/gpu runs the GPU side, in stages.
"""
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NVCC = shutil.which("nvcc") or next((p for p in ["/usr/local/cuda/bin/nvcc"] if os.path.exists(p)), None)
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="no CUDA compiler (nvcc) on this machine")
needs_cmake = pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")


def cuda_include() -> Path:
    """The CUDA toolkit's include folder (nvcc may be a wrapper script outside the toolkit)."""
    dryrun = subprocess.run([NVCC, "--dryrun", "-c", "-x", "cu", "/dev/null"], capture_output=True, text=True).stderr
    top = next(line.split("=", 1)[1].strip() for line in dryrun.splitlines() if line.startswith("#$ TOP="))
    return Path(top).resolve() / "include"


def run(args, **kwargs):
    result = subprocess.run(args, capture_output=True, text=True, timeout=1500, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, args))}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


@needs_cmake
@needs_nvcc
def test_cmake_builds_the_kernels_and_the_standalone_programs(tmp_path):
    build = tmp_path / "build"
    run(["cmake", "-S", ROOT, "-B", build, f"-DCMAKE_CUDA_COMPILER={NVCC}"])
    run(["cmake", "--build", build, f"-j{os.cpu_count()}"])
    assert (build / "libgpt2fast_kernels.a").stat().st_size > 0
    programs = sorted(p.stem for folder in ("tests/cuda", "benchmarks/cuda") for p in (ROOT / folder).glob("*_*.cu"))
    for name in programs:
        assert os.access(build / name, os.X_OK), f"{name} was not built"


@needs_nvcc
def test_bindings_compile_with_their_cuda_parts():
    from torch.utils.cpp_extension import include_paths

    includes = [*include_paths(), sysconfig.get_paths()["include"], str(cuda_include()), str(ROOT / "csrc")]
    # A CPU build of torch ships c10's CUDA headers but not the one its CMake generates (it only sets how
    # c10_cuda is linked): C10_CUDA_NO_CMAKE_CONFIGURE_FILE skips it, as for ROCm builds.
    run([os.environ.get("CXX", "g++"), "-std=c++17", "-fsyntax-only", "-DGPT2FAST_CUDA", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
         "-DTORCH_EXTENSION_NAME=_C", *(f"-I{p}" for p in includes), ROOT / "csrc" / "bindings.cpp"])


def test_the_extension_is_built_and_loads():
    """.ci/install builds gpt2fast._C (its CPU kernels here): the native backend must not be missing it."""
    result = subprocess.run([sys.executable, "-c", "import gpt2fast._C as C; print(C.with_cuda)"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() in ("True", "False")
