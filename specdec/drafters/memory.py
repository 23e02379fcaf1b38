"""Cross-request n-gram memory: what the target generated before, for the n-gram source to draft from.

A model's answers repeat themselves across requests: the same phrasings, list formats, code boilerplate
and arithmetic layouts. `NGramMemory` keeps earlier outputs (and, optionally, a corpus of the target's
own answers built ahead of time, `training/build_ngram_memory.py`) and finds what followed an n-gram in
them. `NGramDrafter(memory=...)` fills its tree with these continuations after the ones found in the
current context, and adds each finished generation to the memory.

The index is a sorted list of `(n-gram..., position)` entries, one per stored position: a lookup is two
binary searches, and memory use is about 160 bytes per token. A generation's entries go into a small sorted
list of recent entries beside it (the big list is never rewritten for one generation; the two are merged
once the recent one holds an eighth as many), and beyond `capacity` the oldest sequences are forgotten an
eighth of the capacity at a time, so a memory that learns for days costs the same per request. Like every
draft source it only proposes; verification keeps the output exact.
"""

from __future__ import annotations

import bisect
import copy
import json
import sys
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from specdec.devices import vocab_size
from specdec.models import ASSETS, fingerprint, same_fingerprint

CONFIG_FILE, TOKENS_FILE = "ngram_memory.json", "ngram_memory.safetensors"
BUILTIN_MEMORY = "smollm2-135m-instruct-ngram"
_SEP = -1  # between stored sequences: no n-gram or continuation crosses it
_TOP = sys.maxsize  # above every token id: (n-gram..., _TOP) bounds the entries starting with that n-gram


class NGramMemory:
    """Token sequences the target produced before, indexed for n-gram lookup across requests.

    Args:
        max_ngram, min_ngram: n-gram lengths looked up, longest first (the first that occurs wins).
        occurrences: most occurrences read per lookup, evenly spread over all of them, so that the
            counts of their continuations estimate how often each followed.
        capacity: most tokens kept (~160 bytes each in RAM); beyond it the oldest sequences are forgotten,
            down to seven eighths of it.

    Attributes:
        base: the model the sequences came from (`{"model", "vocab_size", "fingerprint"}`), set by the
            first `check` when not loaded with the memory; using the memory with another model is an error.
    """

    def __init__(self, max_ngram: int = 4, min_ngram: int = 1, occurrences: int = 64, capacity: int = 1_000_000):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        if min(occurrences, capacity) < 1:
            raise ValueError("occurrences and capacity must be >= 1")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.occurrences, self.capacity = occurrences, capacity
        self.base: dict | None = None
        self._tokens: list[int] = []  # sequences, each followed by _SEP; position p is _tokens[p - _offset]
        self._offset = 0  # positions forgotten from the front
        # sorted (t_p, ..., t_{p+max_ngram-1}, p), padded with _SEP; never changed in place (copies share it)
        self._entries: list[tuple[int, ...]] = []
        self._recent: list[tuple[int, ...]] = []  # entries added since the last merge, sorted the same way

    def __len__(self) -> int:
        """Stored tokens (separators not counted)."""
        return len(self._entries) + len(self._recent)

    def copy(self) -> NGramMemory:
        """An independent memory holding the same sequences; it shares the (unchanging) big index with this one,
        so a copy of a memory of millions of tokens costs a list of token ids, not another index."""
        twin = copy.copy(self)
        twin.base = copy.deepcopy(self.base)
        twin._tokens, twin._recent = list(self._tokens), list(self._recent)
        return twin

    def sequences(self) -> list[list[int]]:
        """The stored sequences, oldest first."""
        found, start = [], 0
        while start < len(self._tokens):
            end = self._tokens.index(_SEP, start)
            found.append(self._tokens[start:end])
            start = end + 1
        return found

    def add(self, sequence: list[int]) -> None:
        """Remember one sequence (e.g. a generation's new tokens)."""
        self.extend([sequence])

    def extend(self, sequences: Iterable[list[int]]) -> None:
        """Remember several sequences, in order: the same memory as `add` on each, built with few sorts
        (a memory of millions of tokens is built in seconds, not hours)."""
        sequences = [s for s in ([int(t) for t in sequence] for sequence in sequences) if s]
        if any(min(sequence) < 0 for sequence in sequences):
            raise ValueError("token ids must be >= 0")  # before anything is stored
        batch, size = [], len(self)
        for sequence in sequences:  # stored in batches that end where `add` would have forgotten
            batch.append(sequence)
            size += len(sequence)
            if size > self.capacity:
                self._store(batch)
                batch, size = [], len(self)
        self._store(batch)

    def _store(self, sequences: list[list[int]]) -> None:
        positions = []
        for sequence in sequences:
            start = self._offset + len(self._tokens)
            self._tokens += [*sequence, _SEP]
            positions += range(start, start + len(sequence))
        new = sorted(self._entry(p) for p in positions)
        if len(new) > 16:
            self._recent = sorted(self._recent + new)  # two sorted runs: one linear merge
        else:
            for entry in new:
                bisect.insort(self._recent, entry)
        if len(self._recent) > len(self._entries) // 8:
            self._entries, self._recent = sorted(self._entries + self._recent), []
        if len(self) > self.capacity:
            self._forget()

    def continuations(self, context: list[int], depth: int) -> list[list[int]]:
        """What followed the longest n-gram ending `context` that occurs here (at most `depth` tokens each,
        up to `occurrences` of them, newest first)."""
        return self.match(context, depth)[1]

    def match(self, context: list[int], depth: int) -> tuple[int, list[list[int]]]:
        """`(n, continuations)`: the length of the longest n-gram ending `context` that occurs here (0 if
        none does) and what followed it, as `continuations` gives it."""
        for n in range(min(self.max_ngram, len(context)), self.min_ngram - 1, -1):
            ngram = tuple(context[-n:])
            ranges = [(index, *_span(index, ngram)) for index in (self._entries, self._recent)]
            count = sum(hi - lo for _, lo, hi in ranges)
            if count == 0:
                continue
            stride = -(-count // self.occurrences)  # evenly spread over both lists
            entries = [e for index, lo, hi in ranges for e in index[lo:hi:stride]]
            found = []
            for entry in sorted(entries, key=lambda e: -e[-1])[: self.occurrences]:
                start = entry[-1] + n - self._offset
                cont = self._tokens[start : start + depth]
                if _SEP in cont:
                    cont = cont[: cont.index(_SEP)]
                if cont:
                    found.append(cont)
            if found:
                return n, found
        return 0, []

    # ---------------------------------------------------------------- the model it belongs to

    def check(self, target: PreTrainedModel) -> None:
        """Bind an unbound memory to `target`; refuse a memory made from another model's outputs.

        Raises:
            ValueError: another vocabulary size, or other weights (fingerprint mismatch).
        """
        vocab = vocab_size(target)
        if self.base is None:
            self.base = {"model": target.config.name_or_path, "vocab_size": vocab, "fingerprint": fingerprint(target)}
            return
        name = self.base.get("model") or "another model"
        if self.base["vocab_size"] != vocab:
            raise ValueError(
                f"this n-gram memory holds token ids of {name!r} (vocabulary {self.base['vocab_size']}), not of "
                f"this model (vocabulary {vocab}); start an empty NGramMemory() or build one for this model "
                f"with training/build_ngram_memory.py"
            )
        if not same_fingerprint(self.base["fingerprint"], fingerprint(target)):
            raise ValueError(
                f"this n-gram memory holds the outputs of {name!r}, and this model's weights differ from it "
                f"(fingerprint mismatch); start an empty NGramMemory() or build one for this model with "
                f"training/build_ngram_memory.py"
            )

    # ---------------------------------------------------------------- files

    def save_pretrained(self, directory: str | Path) -> None:
        """`ngram_memory.json` (settings, base model) + `ngram_memory.safetensors` (the sequences)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        settings = {
            "max_ngram": self.max_ngram,
            "min_ngram": self.min_ngram,
            "occurrences": self.occurrences,
            "capacity": self.capacity,
        }
        (directory / CONFIG_FILE).write_text(json.dumps({**settings, "base": self.base}, indent=2) + "\n")
        save_file({"tokens": torch.tensor(self._tokens, dtype=torch.int32)}, directory / TOKENS_FILE)

    @classmethod
    def from_pretrained(cls, name_or_dir: str | Path) -> NGramMemory:
        """Load a saved memory: a directory, or the built-in `smollm2-135m-instruct-ngram` (the target's
        own answers to training prompts, `training/build_ngram_memory.py`).

        Raises:
            FileNotFoundError: no memory there.
        """
        directory = ASSETS / BUILTIN_MEMORY if str(name_or_dir) == BUILTIN_MEMORY else Path(name_or_dir)
        if not (directory / CONFIG_FILE).is_file():
            raise FileNotFoundError(
                f"no n-gram memory in {directory} (expected {CONFIG_FILE}); build one with "
                f"training/build_ngram_memory.py or use the built-in {BUILTIN_MEMORY!r}"
            )
        config = json.loads((directory / CONFIG_FILE).read_text())
        base = config.pop("base")
        memory = cls(**config)
        memory.base = base
        tokens = load_file(directory / TOKENS_FILE)["tokens"].tolist()
        memory._tokens = tokens
        memory._entries = sorted(memory._entry(p) for p, t in enumerate(tokens) if t != _SEP)
        return memory

    # ---------------------------------------------------------------- internals

    def _entry(self, position: int) -> tuple[int, ...]:
        i = position - self._offset
        key = self._tokens[i : i + self.max_ngram]
        return (*key, *[_SEP] * (self.max_ngram - len(key)), position)

    def _forget(self) -> None:
        """Drop the oldest sequences until at most seven eighths of `capacity` tokens are left (the slack
        spreads the cost of rebuilding the index over many additions)."""
        drop = len(self) - self.capacity + self.capacity // 8  # tokens to forget, rounded up to whole sequences
        cut = 0
        while drop > 0:
            end = self._tokens.index(_SEP, cut)
            drop -= end - cut
            cut = end + 1
        self._offset += cut
        self._tokens = self._tokens[cut:]
        self._entries = sorted(e for e in self._entries + self._recent if e[-1] >= self._offset)
        self._recent = []


def _span(index: list[tuple[int, ...]], ngram: tuple[int, ...]) -> tuple[int, int]:
    """`(lo, hi)`: the entries of sorted `index` that start with `ngram`."""
    lo = bisect.bisect_left(index, ngram)
    return lo, bisect.bisect_left(index, (*ngram, _TOP), lo)
