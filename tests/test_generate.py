"""Greedy equality with `target.generate(do_sample=False)` and Hugging Face generate() compatibility."""

import pytest
import torch
from tiny import ARCHS, EOS, VOCAB, small_draft, tiny_model
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

import specdec
from specdec.drafters import ModelDrafter

SHAPES = {"chain": dict(depth=4, branching=1, tree_budget=4), "tree": dict(depth=4, branching=3, tree_budget=10)}


def prompt(seed: int = 0, length: int = 9) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


class Recorder:
    """A streamer that records what it is given."""

    def __init__(self):
        self.tokens: list[int] = []
        self.ended = False

    def put(self, value: torch.Tensor) -> None:
        self.tokens += value.flatten().tolist()

    def end(self) -> None:
        self.ended = True


class StopAfterToken(StoppingCriteria):
    def __init__(self, token: int):
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


@pytest.fixture(scope="module")
def models():
    return {arch: (tiny_model(arch), small_draft(arch)) for arch in ARCHS}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("draft", ["self", "small"])
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_target_generate(models, arch, draft, shape):
    target, small = models[arch]
    drafter = ModelDrafter(target if draft == "self" else small, **SHAPES[shape])
    for seed in range(2):
        x = prompt(seed)
        expected = target.generate(x, max_new_tokens=30, do_sample=False, eos_token_id=None)
        out = specdec.generate(
            target,
            x,
            drafter=drafter,
            controller=None,
            max_new_tokens=30,
            eos_token_id=None,
            return_dict_in_generate=True,
        )
        assert torch.equal(out.sequences, expected)
        stats = out.spec_stats
        assert stats.new_tokens == 30 and len(stats.accept_lengths) == stats.target_forwards - 1
        if draft == "self":  # the target's own drafts: every step accepts a full-depth path plus the bonus
            full = SHAPES[shape]["depth"] + 1
            assert stats.accept_lengths[:-1] == [full] * (len(stats.accept_lengths) - 1)


def test_greedy_equality_under_eager_attention():
    target, draft = tiny_model("llama", attn="eager"), small_draft("llama")
    x = prompt(3)
    expected = target.generate(x, max_new_tokens=25, do_sample=False, eos_token_id=None)
    for drafter in (ModelDrafter(target), ModelDrafter(draft, depth=3, branching=2)):
        assert torch.equal(specdec.generate(target, x, drafter=drafter, max_new_tokens=25, eos_token_id=None), expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equality_under_sdpa_tree_attention(arch):
    """`load_model`'s default attention (`specdec.attention`): trees and chains, the target's own drafts and a
    smaller model's, every architecture."""
    target, draft = tiny_model(arch, attn="sdpa_tree"), small_draft(arch)
    x = prompt(4)
    expected = target.generate(x, max_new_tokens=25, do_sample=False, eos_token_id=None)
    for drafter in (ModelDrafter(target, **SHAPES["tree"]), ModelDrafter(draft, **SHAPES["chain"])):
        out = specdec.generate(target, x, drafter=drafter, controller=None, max_new_tokens=25, eos_token_id=None)
        assert torch.equal(out, expected)


def generated_without_stop(target, x, n=30):
    return target.generate(x, max_new_tokens=n, do_sample=False, eos_token_id=None)[0, x.shape[1] :].tolist()


def fresh_token(target, start: int) -> tuple[torch.Tensor, int, int]:
    """A prompt, and a position >= start of its greedy continuation whose token does not occur before it."""
    for seed in range(20):
        x = prompt(seed)
        tokens = generated_without_stop(target, x)
        for i in range(start, len(tokens)):
            if tokens[i] not in tokens[:i]:
                return x, i, tokens[i]
    raise AssertionError("no fresh token to stop on")


def assert_cut(accept_lengths: list[int], total: int) -> None:
    """The target drafting for itself (a 5-deep chain) accepts 6 tokens a step; the stop cuts the last step's run
    to what is left before it, not a token more or less."""
    steps = -(-total // 6)
    assert accept_lengths == [6] * (steps - 1) + [total - 6 * (steps - 1)]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_eos_inside_an_accepted_run_stops_exactly(models, arch):
    target, _ = models[arch]
    x, position, eos = fresh_token(target, start=7)
    expected = target.generate(x, max_new_tokens=30, do_sample=False, eos_token_id=eos)
    gen = specdec.SpeculativeGenerator(target, ModelDrafter(target, depth=5, branching=1), controller=None)
    out = gen.generate(x, max_new_tokens=30, eos_token_id=eos, return_dict_in_generate=True)
    assert torch.equal(out.sequences, expected)
    assert out.sequences.shape[1] == x.shape[1] + position + 1 and int(out.sequences[0, -1]) == eos
    assert_cut(out.spec_stats.accept_lengths, position + 1)


def test_max_new_tokens_and_stopping_criteria_end_mid_run(models):
    target, _ = models["llama"]
    x = prompt(5)
    drafter = ModelDrafter(target, depth=5, branching=1)
    for n in (1, 2, 9, 13):
        expected = target.generate(x, max_new_tokens=n, do_sample=False, eos_token_id=None)
        assert torch.equal(specdec.generate(target, x, drafter=drafter, max_new_tokens=n, eos_token_id=None), expected)
    x, position, stop = fresh_token(target, start=8)
    criteria = StoppingCriteriaList([StopAfterToken(stop)])
    expected = target.generate(x, max_new_tokens=30, do_sample=False, eos_token_id=None, stopping_criteria=criteria)
    out = specdec.generate(
        target,
        x,
        drafter=drafter,
        controller=None,
        max_new_tokens=30,
        eos_token_id=None,
        stopping_criteria=criteria,
        return_dict_in_generate=True,
    )
    assert torch.equal(out.sequences, expected) and int(out.sequences[0, -1]) == stop
    assert_cut(out.spec_stats.accept_lengths, position + 1)


def test_streamer_receives_the_same_tokens(models):
    target, small = models["qwen2"]
    x = prompt(6)
    expected, ours = Recorder(), Recorder()
    target.generate(x, max_new_tokens=20, do_sample=False, eos_token_id=None, streamer=expected)
    specdec.generate(target, x, drafter=ModelDrafter(small), max_new_tokens=20, eos_token_id=None, streamer=ours)
    assert ours.tokens == expected.tokens and ours.ended and expected.ended


def test_generation_config_logits_and_left_padding(models):
    target, small = models["llama"]
    x = torch.cat([torch.zeros(1, 3, dtype=torch.long), prompt(7)], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 9, dtype=torch.long)], 1)
    config = GenerationConfig(max_new_tokens=15, do_sample=False, eos_token_id=EOS, pad_token_id=0)
    expected = target.generate(
        x, attention_mask=mask, generation_config=config, return_dict_in_generate=True, output_logits=True
    )
    out = specdec.SpeculativeGenerator(target, ModelDrafter(small)).generate(
        x, attention_mask=mask, generation_config=config, return_dict_in_generate=True, output_logits=True
    )
    assert torch.equal(out.sequences, expected.sequences)
    assert len(out.logits) == len(expected.logits)
    torch.testing.assert_close(torch.cat(out.logits), torch.cat(expected.logits), rtol=1e-4, atol=1e-4)


def test_vocabulary_mismatch_is_a_clear_error(models):
    target, _ = models["llama"]
    other = tiny_model("llama", vocab_size=VOCAB + 16)
    with pytest.raises(ValueError, match=r"vocabulary .* differs .* tokenizer"):
        specdec.generate(target, prompt(), drafter=ModelDrafter(other), max_new_tokens=5)


def test_flash_or_flex_attention_target_is_refused():
    model = tiny_model("llama", attn="flex_attention")
    with pytest.raises(ValueError, match="cannot take the custom 4D tree mask"):
        specdec.SpeculativeGenerator(model, ModelDrafter(small_draft("llama")))
    with pytest.raises(ValueError, match="draft model"):
        ModelDrafter(model)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            dict(inputs=torch.randint(3, VOCAB, (2, 5)), return_dict_in_generate=True, output_logits=True),
            NotImplementedError,
            "output_logits are not supported for batches",
        ),
        (dict(inputs=torch.zeros(1, 0, dtype=torch.long)), ValueError, "empty prompt"),
        (dict(inputs=torch.tensor([[5, 6]]), repetition_penalty=1.3), NotImplementedError, "repetition_penalty"),
        (dict(inputs=torch.tensor([[5, 6]]), num_beams=4), NotImplementedError, "num_beams"),
        (dict(inputs=torch.tensor([[5, 6]]), max_new_tokens=0), ValueError, "max_new_tokens"),
        (dict(inputs=torch.tensor([[5, 6]]), max_length=2), ValueError, "no room"),
        (dict(inputs=torch.tensor([[5, 6]]), attention_mask=torch.tensor([[1, 0]])), ValueError, "left padding"),
        (dict(inputs=torch.tensor([[5, 6]]), foo=1), TypeError, "foo"),
    ],
)
def test_bad_input_is_a_clear_error(models, kwargs, error, message):
    target, small = models["llama"]
    with pytest.raises(error, match=message):
        specdec.generate(target, drafter=ModelDrafter(small), **kwargs)
