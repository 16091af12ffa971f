"""Diffusion: objectives, augmented diffusion training (ADT), samplers, the trainer, sampling to stores, figures; models live in ``dcae15.models``."""

from dcae15.ae.model import channel_mask
from dcae15.diffusion.adt import ADTConfig, default_channel_list, diffusion_loss, masked_mse
from dcae15.diffusion.objectives import DDPMObjective, FlowObjective, Objective, make_objective
from dcae15.diffusion.samplers import SAMPLERS, guided_model, respaced_timesteps, sample_latents

__all__ = ["ADTConfig", "channel_mask", "default_channel_list", "diffusion_loss", "masked_mse", "DDPMObjective",
           "FlowObjective", "Objective", "make_objective", "SAMPLERS", "guided_model", "respaced_timesteps",
           "sample_latents"]
