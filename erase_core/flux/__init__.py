"""Flux-specific pieces shared by the engine: latent packing, the rectified flow, the attention patch."""
