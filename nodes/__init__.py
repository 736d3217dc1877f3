"""ComfyUI V3 glue over ``erase_core``: thin node classes, one module per node family.

Node ids are a public API (shared workflows refer to them): ``NODE_IDS`` lists them and a test pins the list.
"""
from __future__ import annotations

NODE_ID_PREFIX = "EraseFlux"


NODE_IDS = ("EraseFlux_SandboxLoader", "EraseFlux_AttentionInspect", "EraseFlux_AttentionSuppress",
            "EraseFlux_EraseConcept", "EraseFlux_MergeLoras", "EraseFlux_NeighbourPreview")


def node_classes() -> list[type]:
    """The pack's node classes (imports ComfyUI's API; call only inside ComfyUI)."""
    from .attention import AttentionInspect, AttentionSuppress
    from .erase import EraseConcept
    from .merge import MergeLoras
    from .neighbours import NeighbourPreview
    from .sandbox_loader import SandboxLoader

    return [SandboxLoader, AttentionInspect, AttentionSuppress, EraseConcept, MergeLoras, NeighbourPreview]


def get_extension():
    from comfy_api.latest import ComfyExtension

    class EraseFluxExtension(ComfyExtension):
        async def get_node_list(self):
            return node_classes()

    return EraseFluxExtension()
