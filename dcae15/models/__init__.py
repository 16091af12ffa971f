"""Diffusion backbones: DiT and UViT networks, paper-named presets (SiT/USiT pair them with flow matching)."""

from dcae15.models.dit import DiT
from dcae15.models.registry import ARCHS, OBJECTIVES, PRESETS, ModelConfig, Preset, build_model, model_config, preset
from dcae15.models.uvit import UViT

__all__ = ["DiT", "UViT", "ModelConfig", "Preset", "PRESETS", "ARCHS", "OBJECTIVES", "preset", "model_config",
           "build_model"]
