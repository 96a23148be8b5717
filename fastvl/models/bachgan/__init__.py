"""BachGAN (Li et al., CVPR 2020; official code Cold-Winter/BachGAN on NVlabs/SPADE): images from object box layouts.

``BachGAN(cfg)`` holds the generator (Background Fusion Module + SPADE generator with the hallucination head), the
2-scale PatchGAN discriminator and the retrieval memory (bank + foreground set as buffers). Presets:
``bachgan_preset("small" | "official" | "official-ade20k")``.
"""

from .config import CITYSCAPES_FOREGROUND, PRESETS, BachGANConfig, bachgan_preset
from .discriminator import MultiscaleDiscriminator, NLayerDiscriminator
from .generator import SPADE, BackgroundFusion, SPADEGenerator, SPADEResnetBlock, fuse_backgrounds
from .losses import (
    VGG19Features,
    VGGLoss,
    feature_matching_loss,
    hinge_d_loss,
    hinge_g_loss,
    load_vgg19,
    seg_nll_loss,
    vgg_loss_or_none,
)
from .model import BachGAN, GeneratorInput, init_weights
from .retrieval import BackgroundMemory, paste_boxes

__all__ = ["CITYSCAPES_FOREGROUND", "PRESETS", "SPADE", "BachGAN", "BachGANConfig", "BackgroundFusion",
           "BackgroundMemory", "GeneratorInput", "MultiscaleDiscriminator", "NLayerDiscriminator", "SPADEGenerator",
           "SPADEResnetBlock", "VGG19Features", "VGGLoss", "bachgan_preset", "feature_matching_loss",
           "fuse_backgrounds", "hinge_d_loss", "hinge_g_loss", "init_weights", "load_vgg19", "paste_boxes",
           "seg_nll_loss", "vgg_loss_or_none"]
