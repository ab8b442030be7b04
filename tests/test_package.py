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


def _imports(path: Path, package: str) -> set[str]:
    """The mixq modules a source file imports, relative imports resolved against its package."""
    import ast
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module) if p)
            found |= {module} | {f"{module}.{a.name}" for a in node.names}
    return {m for m in found if m.startswith("mixq.")}


def test_check_and_release_stand_apart_from_the_engine():
    """The engine (runner, methods, solvers, formats) never imports the check or the release modules, and they
    never import the engine's layer streaming: each can change without the other."""
    modules = {}
    for path in (ROOT / "quantize").rglob("*.py"):
        parts = path.relative_to(ROOT / "quantize").with_suffix("").parts
        name = ".".join(("mixq.quantize",) + parts).removesuffix(".__init__")
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        modules[name] = _imports(path, package)
    side = ("mixq.quantize.check", "mixq.quantize.release")
    engine = ("mixq.quantize.runner", "mixq.quantize.methods", "mixq.quantize.gptq_solver", "mixq.quantize.awq_search",
              "mixq.quantize.preflight")
    assert len(modules) > 15 and any(m.startswith(side[0]) for m in modules)
    for name, imported in modules.items():
        banned = engine if name.startswith(side) else side if name != "mixq.quantize" else ()
        assert not {m for m in imported if m.startswith(banned)}, (name, imported)
