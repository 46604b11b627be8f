"""The PEFT configuration: which method, its hyper-parameters, and what trains."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from samadapt.errors import ConfigError
from samadapt.peft.adapter import AdapterConfig
from samadapt.peft.lora import LoRAConfig
from samadapt.peft.text_prompt import TextPromptConfig


@dataclass
class PeftConfig:
    """One PEFT method applied to a SAM model.

    Attributes:
        method: a name in ``samadapt.peft.registry.METHODS``: ``msa`` (adapters), ``lora`` or ``msa+lora``.
        adapter / lora: hyper-parameters of each part (used when the method includes it).
        depth: add MSA's depth branch for 3D stacks (needs adapters' slots; works with any method).
        train_modules: module-path prefixes trained in full besides the PEFT weights, e.g. ``mask_decoder`` (SAMed)
            or ``mask_decoder.transformer.layers.1`` (MSA). None takes the method's default policy.
        text: the text-prompt projection (``peft.text_prompt``), trained beside the method's parameters; None: no
            text prompts.
        blend: the weight the trained update is used at, after training (``peft.blend``, WiSE-FT): 1 the trained
            model, 0 the base model, 0.5 halfway in weight space. Training always trains the full update;
            validation, evaluation, prediction and export use the blend. Prompted runs only.
    """

    method: str = "lora"
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    depth: bool = False
    train_modules: list[str] | None = None
    text: TextPromptConfig | None = None
    blend: float = 1.0

    def __post_init__(self) -> None:
        from samadapt.peft.blend import check_blend
        from samadapt.peft.registry import METHODS

        self.blend = check_blend(self.blend)
        if self.method not in METHODS:
            raise ConfigError(f"unknown PEFT method {self.method!r}; choose one of {', '.join(METHODS)}")
        if isinstance(self.adapter, dict):
            self.adapter = AdapterConfig(**self.adapter)
        if isinstance(self.lora, dict):
            self.lora = LoRAConfig(**self.lora)
        if isinstance(self.text, dict):
            self.text = TextPromptConfig(**self.text)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["lora"]["encoder_parts"] = list(self.lora.encoder_parts)
        return data


# Trained in full besides the PEFT weights, by method (see docs/peft.md for the papers' choices).
DEFAULT_TRAIN_MODULES = {
    "msa": [
        "mask_decoder.transformer.layers.1",
        "mask_decoder.transformer.final_attn_token_to_image",
        "mask_decoder.transformer.norm_final_attn",
        "mask_decoder.output_upscaling",
        "mask_decoder.output_hypernetworks_mlps",
        "mask_decoder.iou_prediction_head",
        "mask_decoder.mask_tokens",
        "mask_decoder.iou_token",
    ],
    "lora": ["prompt_encoder", "mask_decoder"],
    "msa+lora": [
        "mask_decoder.transformer.layers.1",
        "mask_decoder.output_upscaling",
        "mask_decoder.output_hypernetworks_mlps",
    ],
}
