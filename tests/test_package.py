"""The package as users install it: one `mixq` namespace, and the README's Python API example as written."""

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import mixq
from tests.models import tiny_torrent

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_installs_one_namespace(tmp_path):
    """Built as pip builds it: every module under mixq/ (convert, quantize and calibration included), no
    top-level convert/quantize/calibration module to collide with others."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("mixq-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"mixq", wheel.name.split("-py3")[0] + ".dist-info"}
    for package in ("convert", "quantize", "calibration"):
        assert f"mixq/{package}/__init__.py" in names
    assert "mixq/convert/gguf_header.py" in names and "mixq/quantize/preflight.py" in names
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    env = dict(os.environ, PYTHONPATH=str(target))
    probe = ("import importlib.util, mixq.convert, mixq.quantize, mixq.calibration; "
             "assert all(importlib.util.find_spec(n) is None for n in ('convert', 'quantize', 'calibration')); "
             "assert mixq.convert.__file__.startswith(%r); assert callable(mixq.convert)" % str(target))
    subprocess.run([sys.executable, "-c", probe], check=True, env=env, cwd=tmp_path)


def test_the_api_is_what_the_commands_run():
    assert callable(mixq.convert) and callable(mixq.quantize)
    assert mixq.convert.open_checkpoint and mixq.quantize.Settings  # still the packages
    assert {"check", "convert", "prepare_calibration", "quantize"} <= set(mixq.__all__)


def test_the_readme_api_example_runs(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    (code,) = re.findall(r"## Python API.*?```python\n(.*?)```", readme, re.S)
    tiny_torrent(tmp_path / "Mixtral-8x7B-v0.1", dim=128, hidden_dim=256)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "mixtral-gptq" / "config.json").is_file() and (tmp_path / "mixtral-hf").is_dir()
