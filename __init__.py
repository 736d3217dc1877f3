"""ComfyUI entry point of the Erase Flux node pack (concept erasure for Flux).

ComfyUI calls :func:`comfy_entrypoint`. Nothing here imports ComfyUI or torch at import time, so importing the
package outside ComfyUI (tests, tools) never fails. The engine is ``erase_core``; the node glue is ``nodes``.
"""
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    """V3 entry: the pack's ``ComfyExtension`` (imports ComfyUI's API lazily)."""
    from .nodes import get_extension

    return get_extension()
