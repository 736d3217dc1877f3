"""erase_core: concept erasure for Flux (EraseAnything, RealEra) in plain torch + diffusers + peft.

Never imports ComfyUI at module level; the ComfyUI glue lives in the pack's ``nodes/``.
"""
__version__ = "0.1.0"
