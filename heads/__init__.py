"""Trainable draft heads, saved and loaded like adapters: Medusa (`heads.medusa`), EAGLE-3 (`heads.eagle`) and the
stream embeddings of speculative streaming (`heads.streams`)."""

from heads.eagle import EagleConfig, EagleHead, export_eagle3
from heads.medusa import MedusaConfig, MedusaHeads, load_medusa2
from heads.streams import StreamConfig, StreamEmbeddings

__all__ = [
    "EagleConfig",
    "EagleHead",
    "MedusaConfig",
    "MedusaHeads",
    "StreamConfig",
    "StreamEmbeddings",
    "export_eagle3",
    "load_medusa2",
]
