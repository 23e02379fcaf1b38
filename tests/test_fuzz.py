"""Random cases over architectures, draft sources, tree settings, EOS positions, lengths and sampling: greedy output
equals `target.generate`'s every time; sampled output is a well-formed generation. Seeded; under a minute."""

import random

import pytest
import torch
from tiny import ARCHS, VOCAB, small_draft, tiny_model

import specdec
from heads import MedusaHeads
from specdec.control import ControlConfig, Controller
from specdec.drafters import Composite, MedusaDrafter, ModelDrafter, NGramDrafter, NGramMemory

CASES = 240
SOURCES = ["self_chain", "self_tree", "small_tree", "ngram", "ngram_memory", "medusa", "composite"]


@pytest.fixture(scope="module")
def models():
    found = {}
    for arch in ARCHS:
        target = tiny_model(arch)
        heads = MedusaHeads.for_model(target, num_heads=3)
        with torch.no_grad():  # random heads, so that they propose something other than the root's echo
            for p in heads.parameters():
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
        found[arch] = (target, small_draft(arch), heads)
    return found


def drafter_for(source: str, rng: random.Random, target, small, heads):
    depth, budget = rng.randint(1, 6), rng.randint(1, 16)
    shape = dict(depth=depth, branching=rng.randint(1, 3), tree_budget=budget)
    if source == "self_chain":
        return ModelDrafter(target, depth=depth, branching=1, tree_budget=budget)
    if source in ("self_tree", "small_tree"):
        return ModelDrafter(target if source == "self_tree" else small, **shape)
    if source == "ngram":
        return NGramDrafter(depth=depth, tree_budget=budget, max_ngram=rng.randint(1, 4))
    if source == "ngram_memory":
        memory = NGramMemory()
        memory.add(torch.randint(3, VOCAB, (60,), generator=torch.Generator().manual_seed(rng.randint(0, 99))).tolist())
        return NGramDrafter(depth=depth, tree_budget=budget, memory=memory)
    if source == "medusa":
        return MedusaDrafter(heads)
    return Composite([NGramDrafter(depth=depth), ModelDrafter(small, **shape)], tree_budget=budget)


def case(index: int, models):
    rng = random.Random(index)
    arch, source = rng.choice(ARCHS), rng.choice(SOURCES)
    target, small, heads = models[arch]
    drafter = drafter_for(source, rng, target, small, heads)
    controller = rng.choice([None, Controller(ControlConfig(warmup_steps=rng.randint(1, 4), probe_after=2))])
    x = torch.randint(3, VOCAB, (1, rng.randint(1, 12)), generator=torch.Generator().manual_seed(index))
    n = rng.randint(1, 24)
    plain = target.generate(x, max_new_tokens=n, do_sample=False, eos_token_id=None)[0, x.shape[1] :].tolist()
    eos = rng.choice([None, rng.choice(plain)])  # a token of the answer: it stops there
    settings = dict(max_new_tokens=n, eos_token_id=eos, pad_token_id=0)
    if rng.random() < 0.25:
        settings.update(do_sample=True, temperature=rng.choice([0.5, 1.0, 1.5]), top_k=rng.choice([0, 5, 50]))
    label = f"case {index}: {arch}, {source}, controller={controller is not None}, n={n}, eos={eos}, {settings}"
    return target, drafter, controller, x, settings, label


def test_random_cases_stay_exact(models):
    sampled = 0
    for index in range(CASES):
        target, drafter, controller, x, settings, label = case(index, models)
        generator = torch.Generator().manual_seed(index)
        out = specdec.generate(target, x, drafter=drafter, controller=controller, generator=generator, **settings)
        if not settings.get("do_sample"):
            expected = target.generate(x, do_sample=False, **settings)
            assert torch.equal(out, expected), label
            continue
        sampled += 1
        new = out[0, x.shape[1] :].tolist()
        eos = settings["eos_token_id"]
        assert torch.equal(out[:, : x.shape[1]], x), label
        assert 1 <= len(new) <= settings["max_new_tokens"] and all(0 <= t < VOCAB for t in new), label
        assert eos not in new[:-1] and (eos in new or len(new) == settings["max_new_tokens"]), label
    assert 30 <= sampled <= CASES - 150  # both kinds were exercised
