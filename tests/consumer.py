"""A real consumer of quantized repositories: transformers 5 with GPTQModel (CPU kernels) and defuser.

Run as a script in its own process (GPTQModel patches transformers on import):
    python tests/consumer.py REPO TOKENS_JSON -> prints the logits as JSON on the last line
"""

import json
import os
import sys

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(repo: str, tokens: list[int]) -> None:
    import torch
    import defuser
    defuser.replace_fused_blocks("mixtral")  # else transformers 5 loads Mixtral experts fused, and random
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(repo, device_map="cpu", dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].float()
    print(json.dumps(logits.tolist()))


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
