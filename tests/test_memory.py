"""Cross-request n-gram memory: lookups against a brute-force reference, forgetting, files, the model it
belongs to, and greedy equality with target.generate when the n-gram source drafts from it."""

import random

import pytest
import torch
from tiny import ARCHS, VOCAB, tiny_model

import specdec
from specdec.drafters import DecodeState, NGramDrafter, NGramMemory


def reference(sequences: list[list[int]], context: list[int], depth: int, max_n: int, min_n: int) -> list[list[int]]:
    """What followed the longest matching n-gram, newest first, by scanning every stored sequence."""
    for n in range(min(max_n, len(context)), min_n - 1, -1):
        ngram, found = context[-n:], []
        for seq in reversed(sequences):
            for p in range(len(seq) - n, -1, -1):
                if seq[p : p + n] == ngram and p + n < len(seq):
                    found.append(seq[p + n : p + n + depth])
        if found:
            return found
    return []


def test_lookups_equal_a_brute_force_scan():
    rng = random.Random(0)
    sequences = [[rng.randrange(6) for _ in range(rng.randrange(1, 30))] for _ in range(40)]
    one_by_one, at_once = NGramMemory(max_ngram=3, min_ngram=1, occurrences=10**6), NGramMemory(3, 1, 10**6)
    for seq in sequences:
        one_by_one.add(seq)  # the first adds are bulk sorts, later ones insertions
    at_once.extend(sequences)
    assert len(one_by_one) == len(at_once) == sum(map(len, sequences))
    for _ in range(200):
        context = [rng.randrange(7) for _ in range(rng.randrange(1, 6))]  # 6 never occurs: shorter n-grams
        expected = reference(sequences, context, 4, 3, 1)
        assert one_by_one.continuations(context, 4) == expected
        assert at_once.continuations(context, 4) == expected


def test_continuations_stop_at_sequence_ends_and_respect_min_ngram():
    memory = NGramMemory(max_ngram=2, min_ngram=2)
    memory.add([1, 2, 3, 4])
    memory.add([5, 1, 2, 9])
    assert memory.continuations([7, 1, 2], 5) == [[9], [3, 4]]  # newest first; nothing from the next sequence
    assert memory.continuations([7, 2], 5) == []  # "7 2" never occurred and unigrams are not looked up
    assert memory.continuations([2], 5) == []  # a context shorter than min_ngram
    assert memory.match([7, 1, 2], 5) == (2, [[9], [3, 4]]) and memory.match([7, 2], 5) == (0, [])  # with n


def test_frequent_ngrams_are_sampled_evenly():
    memory = NGramMemory(max_ngram=1, min_ngram=1, occurrences=30)
    for i in range(300):
        memory.add([8, 1 if i % 3 else 2])  # "8" is followed by 1 two times in three
    found = memory.continuations([8], 1)
    assert len(found) <= 30
    assert abs(found.count([1]) / len(found) - 2 / 3) < 0.1


def test_capacity_forgets_the_oldest_sequences():
    memory = NGramMemory(max_ngram=1, min_ngram=1, capacity=10)
    memory.add([1, 2, 3, 4])
    memory.add([1, 5, 6, 7])
    memory.add([1, 8, 9, 10])  # 12 tokens > 10: the first sequence goes
    assert len(memory) == 8
    assert memory.continuations([1], 1) == [[8], [5]]
    assert memory.continuations([3], 1) == []


def test_extend_keeps_what_adding_one_by_one_keeps():
    rng = random.Random(1)
    sequences = [[rng.randrange(5) for _ in range(rng.randrange(0, 12))] for _ in range(30)]
    one_by_one, at_once = NGramMemory(max_ngram=2, capacity=50), NGramMemory(max_ngram=2, capacity=50)
    for seq in sequences:
        one_by_one.add(seq)
    at_once.extend(seq for seq in sequences)  # any iterable; empty sequences are skipped by both
    assert 40 < len(at_once) <= 50
    assert (at_once._tokens, at_once._offset) == (one_by_one._tokens, one_by_one._offset)
    assert sorted(at_once._entries + at_once._recent) == sorted(one_by_one._entries + one_by_one._recent)
    with pytest.raises(ValueError, match=">= 0"):
        at_once.extend([[1, 2], [3, -4]])
    assert at_once._tokens == one_by_one._tokens  # nothing of the refused batch was stored


def test_a_copy_shares_the_index_and_learns_on_its_own():
    memory = NGramMemory(max_ngram=1, min_ngram=1)
    memory.extend([[1, 2, 3], [1, 4, 5]])
    twin = memory.copy()
    assert twin._entries is memory._entries  # the big index is read once, whatever the number of copies
    twin.add([1, 9])
    memory.add([1, 7])
    assert twin.continuations([1], 1) == [[9], [4], [2]]
    assert memory.continuations([1], 1) == [[7], [4], [2]]


def test_save_and_load_round_trip(tmp_path):
    target = tiny_model("llama")
    memory = NGramMemory(max_ngram=3, min_ngram=1, occurrences=7)
    memory.check(target)
    memory.add([3, 4, 5, 6])
    memory.add([4, 5, 7])
    memory.save_pretrained(tmp_path)
    loaded = NGramMemory.from_pretrained(str(tmp_path))
    assert (loaded.max_ngram, loaded.min_ngram, loaded.occurrences) == (3, 1, 7)
    assert loaded.base == memory.base
    for context in ([4, 5], [5], [3, 4, 5], [9]):
        assert loaded.continuations(context, 3) == memory.continuations(context, 3)
    loaded.check(target)  # the model it came from
    assert NGramDrafter(memory=tmp_path).memory.continuations([4, 5], 3) == [[7], [6]]  # a directory works too
    with pytest.raises(FileNotFoundError, match="build_ngram_memory"):
        NGramMemory.from_pretrained(str(tmp_path / "missing"))


def test_a_memory_of_another_models_outputs_is_refused():
    memory = NGramMemory()
    memory.check(tiny_model("llama", seed=0))  # an empty memory binds to the first model it serves
    with pytest.raises(ValueError, match="fingerprint"):
        memory.check(tiny_model("llama", seed=1))
    with pytest.raises(ValueError, match="vocabulary"):
        memory.check(tiny_model("llama", vocab_size=VOCAB * 2))
    drafter = NGramDrafter(memory=memory)
    with pytest.raises(ValueError, match="fingerprint"):  # the drafter checks at the start of a generation
        specdec.generate(tiny_model("llama", seed=1), torch.tensor([[5, 6, 7]]), drafter=drafter, max_new_tokens=3)


def test_drafter_fills_branches_from_memory_and_remembers_generations():
    memory = NGramMemory(max_ngram=2, min_ngram=1)
    memory.add([40, 41, 42, 43])
    drafter = NGramDrafter(memory=memory, depth=3, branches=2)
    drafter.start(tiny_model("llama"))
    tree = drafter.propose(DecodeState(tokens=torch.tensor([[41, 9, 5, 41]]), max_depth=5))
    paths = [tree.tokens[p[1:]].tolist() for p in tree.paths]
    assert paths == [[9, 5, 41], [42, 43]]  # the context's continuation of "41" first, then the memory's
    drafter.finish([50, 51])
    assert memory.continuations([50], 1) == [[51]]
    NGramDrafter(memory=memory, remember=False).finish([60, 61])
    assert memory.continuations([60], 1) == []


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_target_generate_with_memory(arch):
    target = tiny_model(arch)
    drafter = NGramDrafter(memory=NGramMemory(min_ngram=1))
    prompts = [torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(s)) for s in (0, 1)]
    gained = []
    for x in [prompts[0], prompts[1], prompts[0]]:  # the third repeats the first: the memory holds its answer
        expected = target.generate(x, max_new_tokens=30, do_sample=False, eos_token_id=None)
        out = specdec.generate(
            target, x, drafter=drafter, controller=None, max_new_tokens=30, eos_token_id=None,
            return_dict_in_generate=True,
        )  # fmt: skip
        assert torch.equal(out.sequences, expected)
        gained.append(out.spec_stats.mean_accepted_length)
    assert gained[2] > 3.0  # the remembered answer was drafted and accepted
