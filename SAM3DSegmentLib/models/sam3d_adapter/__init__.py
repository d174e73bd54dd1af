"""The 3DSAM-adapter model family (Gong et al., MedIA 2024): the 2D SAM ViT-B adapted to 3D (imports torch)."""
