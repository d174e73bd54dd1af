"""The 3DSAM-adapter model family (Gong et al., MedIA 2024): the 2D SAM ViT-B adapted to 3D (imports torch)."""
from .checkpoint import build_from_sam_vit_b, load_published, load_sam_vit_b, published_state, save_published
from .config import Sam3DAdapterConfig
from .model import Sam3DAdapter, build_sam3d_adapter
from .predictor import Sam3DAdapterFeatures, Sam3DAdapterPredictor
from .recipes import apply_recipe, recipe_parameter_count, to_dualpath

__all__ = ["Sam3DAdapterConfig", "Sam3DAdapter", "build_sam3d_adapter", "Sam3DAdapterPredictor",
           "Sam3DAdapterFeatures", "load_sam_vit_b", "build_from_sam_vit_b", "load_published", "save_published",
           "published_state", "apply_recipe", "recipe_parameter_count", "to_dualpath"]
