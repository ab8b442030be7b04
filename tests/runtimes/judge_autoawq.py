"""AutoAWQ as the consumer of an AWQ repository: text-generation-webui's AutoAWQ loader, as the card tells users to
run it (`AutoAWQForCausalLM.from_quantized(path, fuse_layers=False)`, transformers 4.51.3, fp16).

Run in its own process with the pinned runtime first on the path (tests/consumers.py starts it):
    python tests/autoawq_consumer.py REPO TOKENS_JSON MAX_NEW
prints, as JSON on the last line: the checkpoint keys the model did not take, the model keys the checkpoint did
not fill, anything left on the meta device, the class of every linear, the fp16 logits of TOKENS and MAX_NEW
greedy tokens after them (transformers' own generate).
"""

import importlib.machinery
import json
import sys
import types
from pathlib import Path


def stand_ins() -> None:
    """What AutoAWQ imports but cannot use here, replaced; each makes it run, none changes its arithmetic."""
    # `datasets` is imported for calibration only, which a consumer never runs
    datasets = types.ModuleType("datasets")
    datasets.__spec__ = importlib.machinery.ModuleSpec("datasets", None)
    datasets.load_dataset = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("datasets stands in"))
    sys.modules["datasets"] = datasets
    # its device query: on "cpu" from_quantized demands intel_extension_for_pytorch before it reaches its own torch
    # fallback. The card asks for a CUDA GPU; answering as one makes it build the WQLinear_GEMM modules a GPU gets,
    # and with fuse_layers=False nothing else reads the answer (WQLinear_GEMM then dequantizes in torch, in fp16)
    import awq.models.base
    awq.models.base.get_best_device = lambda: "cuda:0"


def checkpoint_keys(repo: Path) -> set[str]:
    from safetensors import safe_open
    keys = set()
    for file in sorted(repo.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            keys |= set(f.keys())
    return keys


def main(repo: str, tokens: list[int], max_new: int) -> None:
    stand_ins()
    import torch
    from awq import AutoAWQForCausalLM
    repo = Path(repo)
    wrapper = AutoAWQForCausalLM.from_quantized(str(repo), fuse_layers=False, device_map={"": "cpu"},
                                                torch_dtype=torch.float16)
    model = wrapper.model
    state = model.state_dict()
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    keys = checkpoint_keys(repo)
    linears = {name: type(m).__name__ for name, m in model.named_modules()
               if type(m).__name__.startswith(("Linear", "WQLinear"))}
    with torch.no_grad():
        ids = torch.tensor([tokens])
        logits = model(ids).logits[0].float()
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                                   do_sample=False, pad_token_id=model.config.eos_token_id)[0, len(tokens):]
    print(json.dumps({
        "unexpected": sorted(keys - set(state)),
        "missing": sorted(set(state) - keys - tied),
        "meta": sorted(n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"),
        "linears": linears,
        "logits": logits.tolist(),
        "generated": generated.tolist(),
    }))


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]))
