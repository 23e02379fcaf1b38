"""Trainable draft heads, saved and loaded like adapters: Medusa (`heads.medusa`) and EAGLE-3 (`heads.eagle`)."""

from heads.eagle import EagleConfig, EagleHead, export_eagle3
from heads.medusa import MedusaConfig, MedusaHeads, load_medusa2

__all__ = ["EagleConfig", "EagleHead", "MedusaConfig", "MedusaHeads", "export_eagle3", "load_medusa2"]
