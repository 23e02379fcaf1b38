"""Draft sources: each proposes a `TokenTree` rooted at the last accepted token."""

from specdec.drafters.base import DecodeState, Drafter
from specdec.drafters.composite import Composite
from specdec.drafters.eagle import EagleDrafter
from specdec.drafters.medusa import MedusaDrafter
from specdec.drafters.memory import NGramMemory
from specdec.drafters.model import ModelDrafter
from specdec.drafters.ngram import NGramDrafter
from specdec.drafters.stream import StreamDrafter

__all__ = [
    "Composite",
    "DecodeState",
    "Drafter",
    "EagleDrafter",
    "MedusaDrafter",
    "ModelDrafter",
    "NGramDrafter",
    "NGramMemory",
    "StreamDrafter",
]
