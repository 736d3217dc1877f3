"""Adapters from ``erase_core`` objects to ComfyUI's own types (MODEL, CLIP, VAE); ComfyUI is imported lazily."""
