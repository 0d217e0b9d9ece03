"""Install gpt2fast.

The Triton kernels live in the top-level `kernels/` folder of the source tree and are imported only as
`gpt2fast.kernels`: `gpt2fast/kernels` is a symbolic link to `../kernels`, and the folder has no
`__init__.py`, so `gpt2fast.kernels` is a namespace subpackage of `gpt2fast` (the wheel and the sdist
hold the files themselves under `gpt2fast/kernels/`; an editable install reads them through the link,
new files included). A top-level `kernels` package is another distribution's (Hugging Face's `kernels`,
which transformers depends on): with no `__init__.py`, our folder is at most a namespace portion when
Python starts in the repository root, and an installed regular package of that name always wins over
it. Nothing may import the folder as `kernels`. (Mapping the folder with `package_dir` instead would need
an `__init__.py` there for editable installs, and that package would shadow theirs from the root.)

The C++/CUDA kernels in `csrc/` build into the extension module `gpt2fast._C` when torch is importable
at build time (install with `--no-build-isolation`, so that the build sees the torch you installed):
the CPU kernels always, the CUDA ones too where torch is a CUDA build and a CUDA compiler is found.
GPT2FAST_NO_EXTENSION=1 skips it; without it the `native` backend says why and the ops use the others.
The CUDA kernels compile for sm_80 and sm_90 (A100, H100), or for the architectures in
GPT2FAST_CUDA_ARCHS (e.g. "90": only the GPU a run has, as .ci/gpu builds); MAX_JOBS sets the parallel
compilations (torch's build: every core by default).
"""
import glob
import os
import shutil
import subprocess

from setuptools import find_packages, setup

packages = find_packages(include=["gpt2fast", "gpt2fast.*"]) + ["gpt2fast.kernels"]
TRITON = "triton>=3.6; platform_system == 'Linux'"
CUDA_ARCHS = tuple(os.environ.get("GPT2FAST_CUDA_ARCHS", "80 90").replace(",", " ").split())


def nvcc_toolkit() -> str | None:
    """The CUDA toolkit that `nvcc` belongs to. torch takes the folder above nvcc's, which is wrong where nvcc
    is a wrapper script outside the toolkit (/usr/local/bin/nvcc), and then misses CUDA's headers."""
    if not shutil.which("nvcc"):
        return None
    dryrun = subprocess.run(["nvcc", "--dryrun", "-c", "-x", "cu", os.devnull], capture_output=True, text=True)
    top = [line.split("=", 1)[1].strip() for line in dryrun.stderr.splitlines() if line.startswith("#$ TOP=")]
    return os.path.realpath(top[0]) if top else None


def extension():
    """(ext_modules, cmdclass) for gpt2fast._C, or nothing where it cannot or should not be built."""
    if os.environ.get("GPT2FAST_NO_EXTENSION") == "1":
        return [], {}
    toolkit = None if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") else nvcc_toolkit()
    if toolkit:
        os.environ["CUDA_HOME"] = toolkit  # read by torch.utils.cpp_extension when it is imported below
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("gpt2fast: torch is not importable while building: gpt2fast._C is not built "
              "(pip install --no-build-isolation builds it against the installed torch)")
        return [], {}
    sources = sorted(glob.glob("csrc/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/*.cu"))
    # -fopenmp: at::parallel_for is OpenMP inlined into our code, and without it runs on one thread. No libgomp
    # is linked: its symbols resolve to the one torch loads globally, so one thread pool serves both.
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    if torch.version.cuda and CUDA_HOME and cuda_sources:
        nvcc = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo",
                *(f"-gencode=arch=compute_{a},code=sm_{a}" for a in CUDA_ARCHS)]
        module = CUDAExtension("gpt2fast._C", sources + cuda_sources, define_macros=[("GPT2FAST_CUDA", None)],
                               extra_compile_args={"cxx": cxx, "nvcc": nvcc})
    else:
        module = CppExtension("gpt2fast._C", sources, extra_compile_args={"cxx": cxx})
    return [module], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension()

setup(
    name="gpt2fast",
    version="0.1.0",
    description="A fast, clean GPT-2 for PyTorch: reference ops, Triton and CUDA kernels behind one dispatch point",
    python_requires=">=3.11",
    packages=packages,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.11",
        "numpy",
        "regex",
        "tiktoken>=0.7",
        "safetensors",
        "huggingface_hub",
        "tqdm",
    ],
    extras_require={
        # Triton ships Linux wheels only; the kernels run on an NVIDIA GPU, or on the CPU under TRITON_INTERPRET=1.
        "triton": [TRITON],
        # numpy<2.4: triton 3.6's interpreter, which runs the kernels in the CPU tests, fails on loops with
        # run-time bounds under numpy 2.4 (triton-lang/triton#9171).
        "test": ["pytest", "hypothesis", "scipy", "transformers>=4.45", "pytest-benchmark", "matplotlib", TRITON,
                 "numpy<2.4"],
        # ctranslate2: the CPU peer of the end-to-end phases (no package of gpt2fast's imports it otherwise).
        "bench": ["matplotlib", "transformers>=4.45", "pytest-benchmark", "ctranslate2>=4"],
    },
    entry_points={"console_scripts": ["gpt2fast = gpt2fast.cli:main"]},
)
