"""What the runtimes that serve mixq's repositories refuse, or serve on a slow path, for a choice of settings: read
from their own code (vLLM 0.33.0 and TGI at its archived HEAD; ../shared/reference/runtimes.md has the lines), so a
setting no runtime will load costs one line before the work instead of hours of quantization."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from mixq.convert.spec import ModelSpec

MARLIN_MOE_TILE = 128   # vLLM's Marlin MoE kernel tiles the hidden size by this (marlin_utils.py)
OVERRIDE = "--allow-unloadable"


@dataclass(frozen=True)
class Verdict:
    setting: str                      # as the user asked for it
    refused_by: tuple[str, ...]       # runtimes that will not load the output
    slower_in: tuple[str, ...]        # runtimes that load it on a slow path
    why: str                          # the runtime's own words or behaviour

    def line(self) -> str:
        parts = [f"{_names(self.refused_by)} will not load it"] if self.refused_by else []
        if self.slower_in:
            parts.append(f"{_names(self.slower_in)} serve{'s' if len(self.slower_in) == 1 else ''} it on a "
                         f"slow path")
        return f"{self.setting}: {', '.join(parts)} ({self.why})"

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Verdict":   # as report.json holds it
        return cls(d["setting"], tuple(d["refused_by"]), tuple(d["slower_in"]), d["why"])


def _names(runtimes: tuple[str, ...]) -> str:
    return " and ".join(filter(None, (", ".join(runtimes[:-1]), runtimes[-1])))


def verdicts(settings, spec: ModelSpec) -> list[Verdict]:
    """Every runtime problem of quantizing `spec` with `settings` (runner.Settings); empty when every runtime the
    card names loads the output on its fast kernels. Round-to-nearest is the baseline methods are measured
    against, not a deliverable: it is not judged."""
    found = []
    method, sym = settings.method, settings.scheme.sym
    if method == "gptq" and not sym:
        found.append(Verdict("gptq --asym", ("vLLM",), ("TGI",) if spec.is_moe else (),
                             f"vLLM: Unsupported quantization config: bits={settings.scheme.bits}, sym=False"
                             + ("; TGI runs every expert on every token" if spec.is_moe else "")))
    if method == "gptq" and settings.act_order and not settings.static_groups:
        found.append(Verdict("gptq --desc-act --no-static-groups", ("vLLM",), (),
                             "vLLM: GPTQ group activation ordering (desc_act=True) is no longer supported"))
    if method == "awq" and sym:
        found.append(Verdict("awq --no-zero-point", (), ("vLLM",), "vLLM's Marlin kernel needs the zero point"))
    if method in ("gptq", "awq") and spec.is_moe and spec.hidden_size % MARLIN_MOE_TILE:
        found.append(Verdict(f"hidden size {spec.hidden_size}", (), ("vLLM",),
                             f"its Marlin MoE kernel needs a multiple of {MARLIN_MOE_TILE}"))
    if method in ("gptq", "awq") and spec.is_moe and settings.expert_naming != "classic":
        found.append(Verdict(f"--expert-naming {settings.expert_naming}",
                             ("vLLM", "TGI") + (("AutoAWQ",) if method == "awq" else ()), (),
                             "their Mixtral reads block_sparse_moe.experts.E.w1/w2/w3; vLLM: There is no module or "
                             "parameter named 'layers.0.mlp'"))
    return found


def refusal(found: list[Verdict]) -> str | None:
    """The one line that refuses the settings, or None when nothing is refused or slowed."""
    if not found:
        return None
    return "; ".join(v.line() for v in found) + f"; pass {OVERRIDE} to write it anyway"
