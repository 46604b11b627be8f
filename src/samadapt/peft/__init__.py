"""Parameter-efficient fine-tuning of SAM: MSA adapters, LoRA (SAMed, Cheap Lunch), MSA's 3D depth branch."""

from samadapt.peft.adapter import Adapter, PromptConditionedAdapter
from samadapt.peft.blend import blended, current_blend, set_blend
from samadapt.peft.config import AdapterConfig, LoRAConfig, PeftConfig
from samadapt.peft.depth import DepthBranch, set_depth
from samadapt.peft.inject import (
    apply_peft,
    format_parameter_report,
    is_peft_key,
    load_adapter_weights,
    merge_lora,
    parameter_report,
    read_manifest,
    save_adapter,
    saved_decoder_priors,
    trainable_state_dict,
    unmerge_lora,
)
from samadapt.peft.lora import LoRALinear, add_lora
from samadapt.peft.registry import METHODS, register_method
from samadapt.peft.toggle import disable_adapters

__all__ = [
    "METHODS",
    "Adapter",
    "AdapterConfig",
    "DepthBranch",
    "LoRAConfig",
    "LoRALinear",
    "PeftConfig",
    "PromptConditionedAdapter",
    "add_lora",
    "apply_peft",
    "blended",
    "current_blend",
    "disable_adapters",
    "format_parameter_report",
    "is_peft_key",
    "load_adapter_weights",
    "merge_lora",
    "parameter_report",
    "read_manifest",
    "register_method",
    "save_adapter",
    "saved_decoder_priors",
    "set_blend",
    "set_depth",
    "trainable_state_dict",
    "unmerge_lora",
]
