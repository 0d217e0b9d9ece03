"""Install gpt2fast.

The Triton kernels live in the top-level `kernels/` folder of the source tree and are
installed as `gpt2fast.kernels`, so that no top-level `kernels` package can collide
with another project's.
"""
from setuptools import find_packages, setup

packages = [p for p in find_packages(include=["gpt2fast", "gpt2fast.*"])] + ["gpt2fast.kernels"]
TRITON = "triton>=3.6; platform_system == 'Linux'"

setup(
    name="gpt2fast",
    version="0.1.0",
    description="A fast, clean GPT-2 for PyTorch: reference ops, Triton and CUDA kernels behind one dispatch point",
    python_requires=">=3.11",
    packages=packages,
    package_dir={"gpt2fast.kernels": "kernels"},
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
        "bench": ["matplotlib", "transformers>=4.45", "pytest-benchmark"],
    },
    entry_points={"console_scripts": ["gpt2fast = gpt2fast.cli:main"]},
)
