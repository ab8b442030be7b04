"""A real consumer of quantized repositories: transformers 5 with GPTQModel (CPU kernels) and defuser.

Run as a script in its own process (GPTQModel patches transformers on import):
    python tests/consumer.py REPO TOKENS_JSON [BACKEND]
prints, as JSON on the last line, the logits and the GPTQModel kernel classes that were loaded.

BACKEND is GPTQModel's kernel choice: "torch" (the default here) asks for its plain torch kernel, which dequantizes
the packed weights to the activations' dtype and runs an ordinary matmul, so in fp32 its arithmetic is mixq's
own and the comparison can be tight on any CPU; "auto" lets GPTQModel pick by the CPU's features (on CPUs with
AVX-512 BF16 / AMX it picks its ATen int4 kernel, which computes in bf16).
"""

import json
import os
import sys

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# the torch kernel's name for each format, as GPTQModel and transformers spell it
TORCH_BACKENDS = {"gptq": "torch", "awq": "torch_awq"}


def load(repo: str, backend: str):
    import defuser
    import torch
    defuser.replace_fused_blocks("mixtral")  # else transformers 5 loads Mixtral experts fused, and random
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.quantizers import AutoQuantizationConfig
    config = AutoConfig.from_pretrained(repo)
    quant = AutoQuantizationConfig.from_dict(dict(config.quantization_config))
    method = config.quantization_config["quant_method"]
    quant.backend = TORCH_BACKENDS[method] if backend == "torch" else backend
    return AutoModelForCausalLM.from_pretrained(repo, device_map="cpu", dtype=torch.float32,
                                                quantization_config=quant)


def kernels(model) -> list[str]:
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear
    return sorted({type(m).__name__ for m in model.modules() if isinstance(m, BaseQuantLinear)})


def main(repo: str, tokens: list[int], backend: str = "torch") -> None:
    import torch
    model = load(repo, backend)
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].float()
    print(json.dumps({"kernels": kernels(model), "logits": logits.tolist()}))


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]), *sys.argv[3:])
