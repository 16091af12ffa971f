"""Diffusion backbones: DiT and UViT networks, paper-named presets (SiT/USiT pair them with flow matching), and
backbones given by import path (``package.module:factory``)."""

from dcae15.models.dit import DiT
from dcae15.models.plugin import BackboneError, check_backbone, is_import_path
from dcae15.models.registry import (
    ARCHS,
    OBJECTIVES,
    PRESETS,
    ModelConfig,
    PluginConfig,
    Preset,
    build_model,
    check_backbone_name,
    config_from_dict,
    model_config,
    preset,
)
from dcae15.models.uvit import UViT

__all__ = ["DiT", "UViT", "ModelConfig", "PluginConfig", "Preset", "PRESETS", "ARCHS", "OBJECTIVES", "preset",
           "model_config", "config_from_dict", "build_model", "check_backbone_name", "check_backbone", "is_import_path",
           "BackboneError"]
