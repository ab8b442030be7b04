"""The runtimes that serve mixq's repositories, each pinned and installed into a folder of its own (`make
consumers`, tests/runtimes/install.py), and run as judges in their own processes (judge_*.py), so that this
environment and its transformers stay as they are."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
FOLDER = Path(os.environ.get("MIXQ_CONSUMERS", ROOT / ".consumers"))

# What each judge runs on. A bump here is a deliberate act: `make consumers` reinstalls, and the tests that compare
# the runtime's decisions with quantize/runtimes.py's table fail where a verdict changed.
PINS = {
    # text-generation-webui's AutoAWQ loader: AutoAWQ's last release runs Mixtral with transformers 4.51.3 only
    "autoawq": ("autoawq==0.2.9", "transformers==4.51.3", "tokenizers==0.21.4", "huggingface_hub==0.36.0"),
    # vLLM's own transformers range (<5.21), and the small packages its config and model code import
    "vllm": ("vllm==0.33.0", "transformers==5.20.2", "msgspec==0.23.0", "cachetools==8.0.2", "cloudpickle==3.1.3",
             "cbor2==6.3.0", "pybase64==1.5.1", "py-cpuinfo==9.0.0", "pyzmq==27.3.0", "openai==3.57.0",
             "jiter==0.19.0", "distro==1.9.0", "sniffio==1.3.1"),
}
# wheels of which only the Python files are installed: vLLM's compiled extensions are CUDA code, and an import that
# finds them fails on a CPU where one that finds nothing is stood in for (vllm_standin/sitecustomize.py)
PYTHON_ONLY = {"vllm"}
# folders put on the judge's path before its own install
EXTRA_PATH = {"vllm": (HERE / "vllm_standin",)}


def folder(name: str) -> Path:
    return FOLDER / name


def installed(name: str) -> bool:
    stamp = folder(name) / ".installed"
    return stamp.exists() and json.loads(stamp.read_text()) == list(PINS[name])


def run_judge(name: str, *args: str, timeout: int = 900) -> dict:
    """Run judge_NAME.py on `args` with runtime NAME first on the path; its JSON result, or an AssertionError
    carrying the end of its error output."""
    path = [*map(str, EXTRA_PATH.get(name, ())), str(folder(name))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "VLLM_NO_USAGE_STATS": "1", "VLLM_CONFIGURE_LOGGING": "0"}
    proc = subprocess.run([sys.executable, str(HERE / f"judge_{name}.py"), *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        raise AssertionError(f"{name} failed ({proc.returncode}): {proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
