"""What the package installs, and what Python finds from the repository root.

The wheel ships the Triton kernels as gpt2fast.kernels, with no top-level `kernels` package; no folder of
the source tree may shadow an installed distribution's module for a Python started in its root (our
`kernels/` against Hugging Face's `kernels`, which transformers imports).
"""
import importlib.metadata
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_kernels_inside_the_package(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path)], check=True, capture_output=True,
                   env={**os.environ, "GPT2FAST_NO_EXTENSION": "1"})
    (wheel,) = tmp_path.glob("gpt2fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    kernels = {p.name for p in (ROOT / "kernels").glob("*.py")}
    assert kernels and {f"gpt2fast/kernels/{name}" for name in kernels} <= set(names)
    assert "gpt2fast/ops/reference.py" in names
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"gpt2fast"}
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "gpt2fast = gpt2fast.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def from_root(code: str) -> subprocess.CompletedProcess:
    """`python -c code` started in the repository root, as a developer's shell would (the root is on sys.path)."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_no_top_level_folder_but_the_package_is_a_regular_package():
    """A folder with an __init__.py in the root is a regular package for a Python started there, and wins over
    any installed module of its name; without one it is at most a namespace portion, which an installed
    module always beats."""
    packages = sorted(p.parent.name for p in ROOT.glob("*/__init__.py"))
    assert packages == ["gpt2fast"], packages


def test_installed_modules_win_over_our_folders_from_the_root():
    """Every top-level name that an installed distribution other than ours provides, and that is also a folder
    in the root, imports the installed module from there."""
    ours = {p.name for p in ROOT.iterdir() if p.is_dir()}
    clashes = sorted(name for name, dists in importlib.metadata.packages_distributions().items()
                     if name in ours and set(dists) - {"gpt2fast"})
    if not clashes:
        pytest.skip("no installed distribution provides a module named as a folder of ours")
    code = ("import importlib.util, json, sys; "
            f"print(json.dumps({{n: importlib.util.find_spec(n).origin for n in {clashes!r}}}))")
    result = from_root(code)
    assert result.returncode == 0, result.stderr
    for name, origin in json.loads(result.stdout).items():
        assert origin is not None and not Path(origin).resolve().is_relative_to(ROOT / name), (name, origin)


def test_transformers_builds_a_gpt2_from_the_root():
    """transformers imports Hugging Face's `kernels` while it builds a model (where it is installed)."""
    pytest.importorskip("transformers")
    code = ("import transformers; "
            "m = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)); "
            "print(sum(p.numel() for p in m.parameters()))")
    result = from_root(code)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) > 0


def test_kernels_import_as_gpt2fast_kernels_from_anywhere(tmp_path):
    result = subprocess.run([sys.executable, "-c", "import gpt2fast.kernels.gelu_mlp as m; print(m.__file__)"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).resolve() == (ROOT / "kernels" / "gelu_mlp.py").resolve()
