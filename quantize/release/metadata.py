"""A card's front matter as the Hub reads it (huggingface_hub's ModelCardData): the base model by its Hub id with
`base_model_relation: quantized` (so the Hub lists the repository under the original's quantizations), the
library and pipeline that pick its widget and filters, the license and languages the source's own card states,
the calibration dataset, who quantized it. A local path is never written: it names nothing on the Hub."""

from __future__ import annotations

from dataclasses import dataclass, field

from mixq.convert.provenance import hub_id


def calibration_dataset(source: str | None) -> str | None:
    """The Hub dataset a calibration source names (a preset's dataset, hf:ID, ORG/NAME[:CONFIG]); None for the
    built-in texts and local files."""
    from mixq.calibration import PRESETS
    if not source:
        return None
    if source in PRESETS:
        return PRESETS[source].dataset
    name = source.removeprefix("hf:").split(":")[0]
    return hub_id(name)


@dataclass
class CardData:
    base_model: str | None            # as given: a Hub id, or a local path or name (then not written)
    library: str                      # transformers (AWQ, GPTQ) or gguf
    model_type: str
    prompt_template: str
    tags: list[str]
    source: dict = field(default_factory=dict)   # the source's own card's license and languages (provenance)
    license: str | None = None        # flags; None: the source's
    language: list[str] | None = None
    datasets: list[str] = field(default_factory=list)
    quantized_by: str | None = None

    def front_matter(self) -> str:
        from huggingface_hub import ModelCardData
        base = hub_id(self.base_model)
        language = self.language or self.source.get("language")
        data = ModelCardData(
            base_model=base, base_model_relation="quantized" if base else None, library_name=self.library,
            pipeline_tag="text-generation", license=self.license or self.source.get("license"),
            license_name=None if self.license else self.source.get("license_name"),
            language=[language] if isinstance(language, str) else language, datasets=self.datasets or None,
            tags=self.tags, quantized_by=self.quantized_by, model_type=self.model_type,
            prompt_template=self.prompt_template, inference=False)
        return "---\n" + data.to_yaml() + "\n---\n"
