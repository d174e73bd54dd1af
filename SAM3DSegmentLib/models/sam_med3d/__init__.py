"""models.sam_med3d."""
