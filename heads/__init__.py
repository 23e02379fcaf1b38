"""Trainable draft heads, saved and loaded like adapters: Medusa heads (`heads.medusa`)."""

from heads.medusa import MedusaConfig, MedusaHeads, load_medusa2

__all__ = ["MedusaConfig", "MedusaHeads", "load_medusa2"]
