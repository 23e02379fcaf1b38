"""Draft sources: each proposes a `TokenTree` rooted at the last accepted token."""

from specdec.drafters.base import DecodeState, Drafter
from specdec.drafters.model import ModelDrafter

__all__ = ["DecodeState", "Drafter", "ModelDrafter"]
