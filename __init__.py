"""ComfyUI entry point of the Erase Flux node pack (concept erasure for Flux).

ComfyUI calls :func:`comfy_entrypoint`. Nothing here imports ComfyUI or torch at import time, so importing the
package outside ComfyUI (tests, tools) never fails. The engine is ``erase_core``; the node glue is ``nodes``.
"""
import os
import sys

WEB_DIRECTORY = "./web"
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # the engine is imported as ``erase_core``; appended, so ComfyUI's own ``nodes`` stays first
    sys.path.append(_HERE)


async def comfy_entrypoint():
    """V3 entry: the pack's ``ComfyExtension`` (imports ComfyUI's API lazily)."""
    from .nodes import get_extension

    return get_extension()
