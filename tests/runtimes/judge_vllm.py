"""vLLM as the judge of a quantized repository: its own code, from the config to the loaded parameters.

Run in its own process with the pinned vLLM (Python files of its wheel) and vllm_standin/ first on the path
(tests/runtimes/__init__.py starts it):
    python tests/runtimes/judge_vllm.py REPO
prints, as JSON on the last line, what vLLM decided:
- "method": the quantization method its override chain picks for the repository's config (what `vllm serve
  REPO` with no --quantization uses), or "refused": the error its config class raises;
- "kernels": the quant method vLLM gives each kind of layer and the kernel that method chose (the same for every
  decoder layer, so keyed by the name with the layer index replaced by N): Marlin or not, dense and MoE;
- "unloaded": parameters of vLLM's Mixtral that the checkpoint did not fill, less the expert biases vLLM
  zero-initializes for checkpoints without them ("zero_biases"); "dropped": checkpoint tensors vLLM's loader
  discarded on purpose; "unread": the others that never reached a parameter; "load_error": what its loader
  raised.
The model is built by vLLM's initialize_model under a one-process gloo group on the CPU, with the GPU stood in
for (an H100, vllm_standin/); its weights are loaded by the model's own load_weights. Nothing is run on them.
"""

import json
import re
import socket
import sys
from importlib.metadata import version
from pathlib import Path


def layer_key(name: str) -> str:
    return re.sub(r"\.layers\.\d+\.", ".layers.N.", name)


def kernel(method) -> str:
    """The quant method's class and the kernel it chose: the linear kernel for a dense layer (MarlinLinearKernel
    and so on), the int_wna16 backend for the MoE."""
    name = type(method).__name__
    if getattr(method, "kernel", None) is not None:
        return f"{name}/{type(method.kernel).__name__}"
    if getattr(method, "wna16_moe_backend", None) is not None:
        return f"{name}/{method.wna16_moe_backend.name}"
    return name


def refusal(e: Exception) -> str:
    """The config class's own message (pydantic wraps it: "Value error, MESSAGE [type=value_error, ...]")."""
    found = re.search(r"Value error, (.*?) \[type=", str(e), re.S)
    return " ".join((found.group(1) if found else str(e) or type(e).__name__).split())


def checkpoint(repo: Path) -> dict:
    from safetensors.torch import load_file
    tensors = {}
    for file in sorted(repo.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def storage(t) -> int:
    return t.untyped_storage().data_ptr()


class Reads:
    """The storage of every tensor a torch operation computed with while active, metadata queries aside (a
    loader asks every offered tensor its rank before it matches the name): what a loader copied into a
    parameter, directly, through views, or converted first (vLLM's MoE WNA16 loader repacks AWQ's layout)."""

    METADATA = {"dim", "size", "numel", "__get__", "stride", "is_contiguous", "element_size", "data_ptr",
                "untyped_storage", "__len__", "__format__", "__repr__"}

    def __enter__(self):
        import torch
        from torch.overrides import TorchFunctionMode
        self.sources = sources = set()
        metadata = self.METADATA

        class Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if getattr(func, "__name__", "") not in metadata:
                    sources.update(storage(a) for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
                return func(*args, **kwargs)
        self.mode = Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def host_groups() -> None:
    """The process groups' device is the GPU's (cuda:0 on the stood-in H100); a loader that moves a tensor to it
    (vLLM's MoE WNA16 fallback does) gets the host instead, where this judge keeps every parameter."""
    import torch
    from vllm.distributed import parallel_state
    for group in vars(parallel_state).values():
        if isinstance(group, parallel_state.GroupCoordinator):
            group.device = torch.device("cpu")


def construction_ops() -> None:
    """Compiled ops some layers bind when they are built (a CUDA platform's SiluAndMul takes torch.ops._C's),
    defined so that they exist; calling one fails, and nothing here calls them."""
    import torch
    for name, schema in CONSTRUCTION_OPS.items():
        if not hasattr(torch.ops._C, name):
            torch.library.define(f"_C::{name}", schema)


CONSTRUCTION_OPS = {"silu_and_mul": "(Tensor(a!) result, Tensor input) -> ()"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def record_drops(dropped: list) -> None:
    """Note every checkpoint name vLLM's loader discards (mapped to None, or skipped by prefix or suffix)."""
    from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper
    mapped = WeightsMapper._map_name_with_shard
    skip = AutoWeightsLoader._can_skip

    def map_name(self, key):
        result = mapped(self, key)
        if result is None:
            dropped.append(key)
        return result

    def can_skip(self, name):
        if skip(self, name):
            dropped.append(name)
            return True
        return False
    WeightsMapper._map_name_with_shard = map_name
    AutoWeightsLoader._can_skip = can_skip


def judge(repo: Path) -> dict:
    import torch
    from vllm.config import ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.platforms import current_platform
    out = {"versions": {p: version(p) for p in ("vllm", "transformers")},
           "platform": current_platform.get_device_name()}
    try:
        model_config = ModelConfig(model=str(repo), tokenizer=str(repo), dtype="float16", skip_tokenizer_init=True,
                                   enforce_eager=True)
        out["method"] = model_config.quantization
        config = VllmConfig(model_config=model_config)
    except Exception as e:  # vLLM's refusal of the config, in its words
        out["refused"] = refusal(e)
        return out
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.model_executor.model_loader.utils import initialize_model
    construction_ops()
    with set_current_vllm_config(config), torch.device("cpu"):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"tcp://127.0.0.1:{free_port()}")
        initialize_model_parallel(1, 1)
        host_groups()
        torch.set_default_dtype(torch.float16)
        model = initialize_model(vllm_config=config)
    out["model"] = type(model).__name__
    out["kernels"] = {layer_key(n): kernel(m.quant_method) for n, m in model.named_modules()
                      if getattr(m, "quant_method", None) is not None}
    params = dict(model.named_parameters())
    dropped = []
    record_drops(dropped)
    tensors = checkpoint(repo)
    try:
        with Reads() as reads:
            loaded = set(model.load_weights(iter(tensors.items())))
    except Exception as e:
        out["load_error"] = f"{type(e).__name__}: {e}"
        return out
    # a name a loader matches to nothing can be skipped without a word (vLLM's expert loader does so): what was
    # computed with, not what was offered, is what the model holds
    out["unread"] = sorted(n for n, t in tensors.items() if storage(t) not in reads.sources and n not in dropped
                           and not n.endswith(".g_idx"))
    missing = set(params) - loaded
    zero_biases = {n for n in missing if n.endswith("_bias") and not params[n].any()}
    out["unloaded"] = sorted(missing - zero_biases)
    out["zero_biases"] = sorted({layer_key(n) for n in zero_biases})
    out["dropped"] = sorted(dropped)
    return out


def main(repo: str) -> None:
    result = judge(Path(repo))
    import sitecustomize
    result["stood_in"] = sorted({name.split(".")[0] if not name.startswith("vllm.") else ".".join(name.split(".")[:2])
                                 for name in sitecustomize.STOOD_IN})
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
