"""What vLLM imports but a CPU without its serving stack cannot give it, stood in for at interpreter start (this
folder is on PYTHONPATH of the judge and of the subprocess vLLM starts to inspect the model class).

None of these is reached by what the judge runs (config parsing, choice of kernels, building the model's
parameters, loading the checkpoint's names into them); each stand-in only lets an import succeed:
- SERVING: packages the API server, structured output and tool parsing import at module level;
- vLLM's compiled extensions (`vllm._C`, `vllm._moe_C...`: CUDA code, not shipped by the judge's install) and
  its bundled flash-attention, which refuses to import without its CUDA build;
- two compiled-op capability queries `vllm._custom_ops` answers at import time (`cutlass_scaled_mm_supports_fp8`
  and `..._block_fp8`): FP8 only, answered False, which no int4 choice reads.
The GPU itself is stood in for by an out-of-tree platform plugin (mixq_vllm_standin), vLLM's own mechanism; the
judge (judge_vllm.py) adds the last two: the compiled ops some layers bind when they are built, and the host as the
process groups' device.
"""

import importlib.abc
import importlib.machinery
import sys
import types

SERVING = {"aiohttp", "openai_harmony", "uvloop", "prometheus_client", "xgrammar", "fastapi", "partial_json_parser",
           "llguidance", "einops", "compressed_tensors"}
FP8_QUERIES = ("cutlass_scaled_mm_supports_block_fp8", "cutlass_scaled_mm_supports_fp8")
STOOD_IN: list[str] = []


class _AnyMeta(type):
    def __getattr__(cls, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _Any

    def __getitem__(cls, item):
        return _Any

    def __or__(cls, other):
        return _Any

    __ror__ = __or__


class _Any(metaclass=_AnyMeta):
    """Any name a stood-in module is asked for: a class, subclassable, callable, usable in type hints."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _Any()

    def __getattr__(self, name):
        return _Any()

    @classmethod
    def __get_pydantic_core_schema__(cls, source, handler):
        from pydantic_core import core_schema
        return core_schema.any_schema()


class _Module(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _Any


def _stood_in(name: str, path) -> bool:
    if name == "vllm.vllm_flash_attn" or name.startswith("vllm.vllm_flash_attn."):
        return True
    if name.startswith("vllm."):  # a compiled extension: vllm._X with no Python source
        return name.split(".")[1].startswith("_") and importlib.machinery.PathFinder.find_spec(name, path) is None
    return name.split(".")[0] in SERVING


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name == "vllm._custom_ops":
            return self._patched(name, path)
        if _stood_in(name, path):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        STOOD_IN.append(spec.name)
        module = _Module(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass

    @staticmethod
    def _patched(name, path):
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            for query in FP8_QUERIES:
                setattr(module, query, lambda *args, **kwargs: False)
        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _Finder())
