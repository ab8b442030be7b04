"""One H100 (compute capability 9.0), as vLLM's CUDA platform sees it without NVML: the GPU the card tells users
to serve on. Only the queries the kernel choices read are answered; nothing here runs a kernel."""

from vllm.platforms.cuda import NonNvmlCudaPlatform
from vllm.platforms.interface import DeviceCapability

CAPABILITY = (9, 0)


class H100(NonNvmlCudaPlatform):
    @classmethod
    def get_device_capability(cls, device_id: int = 0) -> DeviceCapability:
        return DeviceCapability(*CAPABILITY)

    @classmethod
    def get_device_name(cls, device_id: int = 0) -> str:
        return "NVIDIA H100 80GB HBM3 (stood in)"

    @classmethod
    def device_count(cls) -> int:
        return 1
