"""Optic's client side: the typed Vision API client, ``optic infer``, ``optic bench``.

``from optic.client import VisionClient`` is the short way in; the task
modules (``optic.server.tasks``) supply every result type.
"""

from optic.client.vision import (
    Caption,
    Classification,
    Credentials,
    Detection,
    ModelInfo,
    Segmentation,
    VisionClient,
    open_channel,
)

__all__ = [
    "Caption",
    "Classification",
    "Credentials",
    "Detection",
    "ModelInfo",
    "Segmentation",
    "VisionClient",
    "open_channel",
]
