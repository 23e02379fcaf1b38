"""eval/replay.py: acceptance replayed from recorded greedy answers equals what the decoding loop measures."""

import pytest
import torch
from tiny import EOS, tiny_model

import specdec
from eval.replay import accepted_length, replay_turn
from specdec.drafters import DecodeState, Drafter, NGramDrafter
from specdec.tree import TokenTree


def test_accepted_length_follows_the_answer_down_the_tree():
    tree = TokenTree.trie(9, [[1, 2, 3], [1, 4], [5]])
    assert accepted_length(tree, [1, 4, 9]) == 2
    assert accepted_length(tree, [1, 2, 3, 8]) == 3
    assert accepted_length(tree, [5, 5]) == 1
    assert accepted_length(tree, [7, 1]) == 0
    assert accepted_length(tree, [1, 2]) == 2  # the answer ends inside the tree
    assert accepted_length(TokenTree.chain(9), [1]) == 0


class Oracle(Drafter):
    """Proposes the answer itself (`right`) or tokens it never has (`wrong`), as deep as it may."""

    def __init__(self, answer: list[int], prompt_length: int, right: bool):
        self.answer, self.start_at, self.right = answer, prompt_length, right

    def propose(self, state: DecodeState) -> TokenTree:
        done = state.tokens.shape[1] - self.start_at
        chain = self.answer[done : done + state.max_depth] if self.right else [-1] * state.max_depth
        return TokenTree.chain(state.root, chain)


@pytest.mark.parametrize(("right", "depth", "expected"), [(True, 4, [5, 5, 2]), (True, 16, [12]), (False, 4, [1] * 12)])
def test_replay_turn_gains_accepted_drafts_plus_the_bonus_token(right, depth, expected):
    prompt, answer = [3, 4], list(range(10, 22))
    assert replay_turn(Oracle(answer, len(prompt), right), prompt, answer, depth, budget=8) == expected


@pytest.mark.parametrize("prompt", [[5, 6, 7, 5, 6, 7, 5], [9, 3, 9, 3, 9, 3, 9, 3, 1]])
def test_replay_equals_the_decoding_loop_without_controller(prompt):
    target = tiny_model("llama")
    ids = torch.tensor([prompt])
    out = specdec.generate(
        target, ids, drafter=NGramDrafter(), controller=None, max_new_tokens=40, return_dict_in_generate=True
    )
    answer = out.sequences[0, len(prompt) :].tolist()
    assert answer == target.generate(ids, max_new_tokens=40, do_sample=False)[0, len(prompt) :].tolist()
    assert EOS not in answer[:-1]
    drafter = NGramDrafter()
    drafter.start(target)
    replayed = replay_turn(drafter, prompt, answer, depth=drafter.depth, budget=drafter.tree_budget)
    assert replayed == out.spec_stats.accept_lengths
    assert max(replayed) > 1  # the n-gram source was accepted somewhere: the comparison covers drafts
