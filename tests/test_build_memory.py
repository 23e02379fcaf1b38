"""training/build_ngram_memory.py: the held-out replay figure, by hand."""

from tiny import tiny_model

from specdec.drafters import NGramDrafter, NGramMemory
from training.build_ngram_memory import replay


def test_replay_counts_the_tokens_greedy_decoding_would_gain_per_step():
    target = tiny_model("llama")
    rows = [{"prompt_ids": [20, 21], "answer_ids": [30, 31, 32, 33, 34]}]
    assert replay(NGramDrafter(), target, rows, depth=8) == 1.0  # nothing repeats: one token a step
    memory = NGramMemory(min_ngram=1)
    memory.add([21, 30, 31, 32, 33, 34])
    assert replay(NGramDrafter(memory=memory, remember=False), target, rows, depth=8) == 5.0  # all in one step
    assert replay(NGramDrafter(memory=memory, remember=False), target, rows, depth=2) == 5 / 2  # 3 tokens, then 2
    rows = [{"prompt_ids": [5, 6, 7, 8], "answer_ids": [5, 6, 7, 8, 9]}]  # repeats its prompt
    assert replay(NGramDrafter(), target, rows, depth=8) == 5 / 2  # "5" alone, then "6 7 8" accepted + "9"
    assert len(memory) == 6  # replaying never adds to the memory
