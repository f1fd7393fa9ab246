"""Denoiser networks: the U-Net for images and the MLP for vector data."""

from tfngd.networks.blocks import AttentionBlock, ResidualBlock, SinusoidalTimeEmbedding
from tfngd.networks.mlp import build_mlp_denoiser
from tfngd.networks.unet import build_unet

__all__ = [
    "AttentionBlock",
    "ResidualBlock",
    "SinusoidalTimeEmbedding",
    "build_mlp_denoiser",
    "build_unet",
]
