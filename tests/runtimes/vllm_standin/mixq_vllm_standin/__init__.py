"""An out-of-tree vLLM platform plugin (entry point `vllm.platform_plugins`): the judge's stand-in for one H100."""


def plugin() -> str:
    return "mixq_vllm_standin.platform.H100"
