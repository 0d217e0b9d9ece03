"""The built wheel ships the Triton kernels as gpt2fast.kernels, with no top-level `kernels` package."""
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_kernels_inside_the_package(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps",
                    "-q", "-w", str(tmp_path)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("gpt2fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "gpt2fast/kernels/__init__.py" in names
    assert "gpt2fast/ops/reference.py" in names
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"gpt2fast"}
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "gpt2fast = gpt2fast.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
