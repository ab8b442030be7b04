import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# a consumer that crashes inside a native kernel (GPTQModel's compiled dequantization over a model whose experts
# were left uninitialised) must exit, not hang: llama.cpp's library, loaded in the same process, answers a C++
# terminate by forking a debugger to print a backtrace and waiting for it
os.environ.setdefault("GGML_NO_BACKTRACE", "1")

import pytest  # noqa: E402
from click.testing import CliRunner  # noqa: E402


@pytest.fixture
def cli():
    """Run `mixq ARGS...` in-process; returns click's Result (exit_code, stdout, stderr)."""
    from mixq.cli import main

    def run(*args):
        return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return run
