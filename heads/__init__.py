"""Trainable draft heads (Medusa) saved and loaded like adapters. Not implemented yet: see the issues."""
