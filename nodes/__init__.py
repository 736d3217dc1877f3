"""ComfyUI V3 glue over ``erase_core``: thin node classes, one module per node family.

The node families (attention inspection, suppression, erase training, LoRA merge, neighbour preview, sandbox loader)
are built in the node-pack issue; until then the extension registers no nodes.
"""
from __future__ import annotations

NODE_ID_PREFIX = "EraseFlux"


def node_classes() -> list[type]:
    """The pack's node classes (imports ComfyUI's API; call only inside ComfyUI)."""
    return []


def get_extension():
    from comfy_api.latest import ComfyExtension

    class EraseFluxExtension(ComfyExtension):
        async def get_node_list(self):
            return node_classes()

    return EraseFluxExtension()
