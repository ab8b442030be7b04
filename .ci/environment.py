"""Print what decides the numerics of a test run, before the tests: a tolerance that holds on one machine and not
on another shows up here first (GPTQModel picks its CPU kernels by these CPU flags)."""

import platform
import sys
from importlib import metadata

PACKAGES = ("torch", "transformers", "gptqmodel", "gguf", "safetensors", "numpy", "tokenizers", "llama_cpp_python")
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")


def version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def cpu() -> tuple[str, list[str]]:
    model, flags = platform.processor() or "?", set()
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    return model, [f for f in CPU_FLAGS if f in flags]


def gpu() -> str:
    import torch
    if not torch.cuda.is_available():
        return "none"
    return ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))


def main() -> None:
    model, flags = cpu()
    rows = [("python", sys.version.split()[0])] + [(p, version(p)) for p in PACKAGES]
    rows += [("cpu", model), ("cpu flags", " ".join(flags) or "none of " + " ".join(CPU_FLAGS)), ("gpu", gpu())]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k.ljust(width)}  {v}" for k, v in rows), flush=True)


if __name__ == "__main__":
    main()
