"""The harness's failing draft sources stay exact (how fast the controller leaves them is for the benchmark:
on a tiny model verification is nearly free, and the controller rightly keeps drafting there)."""

import torch
from tiny import VOCAB, tiny_model

import specdec
from eval.stress import Collapsing, Useless
from specdec.drafters import NGramDrafter


def test_sources_made_to_fail_stay_exact():
    target = tiny_model("llama")
    x = torch.randint(3, VOCAB, (1, 10), generator=torch.Generator().manual_seed(0))
    expected = target.generate(x, max_new_tokens=60, do_sample=False, eos_token_id=None)
    for drafter in (Useless(VOCAB), Collapsing(NGramDrafter(), VOCAB, after=20)):
        out = specdec.generate(
            target, x, drafter=drafter, max_new_tokens=60, eos_token_id=None, return_dict_in_generate=True
        )
        assert torch.equal(out.sequences, expected)
