"""The config presets ship inside the installed package: a non-editable wheel, installed on its own, loads ``demo``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_wheel_install_loads_the_demo_config_outside_the_repository(tmp_path):
    src = tmp_path / "src"  # build from a copy: the build leaves build/ and *.egg-info behind
    for name in ("flows", "dcae15", "storage"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, capture_output=True, env=env, timeout=600)
    (wheel,) = (tmp_path / "dist").glob("dcae15-*.whl")
    target = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True,
                   capture_output=True, env=env, timeout=600)
    code = ("import sys; sys.path.insert(0, sys.argv[1])\n"
            "import flows.config as c\n"
            "assert c.__file__.startswith(sys.argv[1]), c.__file__\n"
            "cfg = c.load_config('demo')\n"
            "print(c.preset_names(), cfg.diffusion.backbones, cfg.resolution)\n")
    out = subprocess.run([sys.executable, "-c", code, str(target)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "['demo', 'imagenet', 'rehearsal', 'tiny'] ['SiT-tiny', 'USiT-tiny'] 32" in out.stdout
