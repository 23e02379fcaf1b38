"""A generator that runs for days, and bad input tried as a new user would: each behaviour with a test that fails
when it breaks."""

import pickle
import threading
import warnings

import pytest
import torch
from tiny import VOCAB, tiny_model
from transformers import AutoTokenizer, TextIteratorStreamer
from transformers.utils import logging as hf_logging

import specdec
from specdec import verify
from specdec.control import ControlConfig, Controller
from specdec.drafters import MedusaDrafter, ModelDrafter, NGramDrafter, NGramMemory
from specdec.drafters.base import DecodeState
from specdec.models import ASSETS, BUILTIN_DRAFT
from specdec.tree import TokenTree


def prompt(seed: int = 0, length: int = 9) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def greedy(target, drafter, x, n=30, **kwargs):
    expected = target.generate(x, max_new_tokens=n, do_sample=False, eos_token_id=None)
    out = specdec.generate(target, x, drafter=drafter, max_new_tokens=n, eos_token_id=None, **kwargs)
    return out, expected


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


# ---------------------------------------------------------------- sliding windows


@pytest.mark.parametrize("arch", ["mistral_default", "qwen2_sliding"])
def test_sliding_window_models_work_while_the_generation_fits_the_window(arch):
    if arch == "mistral_default":
        target = tiny_model("mistral", sliding_window=4096)  # MistralConfig's default window
    else:
        target = tiny_model("qwen2", use_sliding_window=True, sliding_window=4096, max_window_layers=1)
    assert specdec.kv.sliding_window(target.config) == 4096
    drafter = ModelDrafter(target, depth=4, branching=3, tree_budget=10)  # a tree, not only a chain
    out, expected = greedy(target, drafter, prompt(1, length=30), n=30, controller=None)
    assert torch.equal(out, expected)


def test_a_generation_that_can_outgrow_the_window_is_refused_before_it_starts():
    target = tiny_model("mistral", sliding_window=40)
    x = prompt(2, length=30)
    out, expected = greedy(target, ModelDrafter(target), x, n=10)  # 40 tokens: inside the window
    assert torch.equal(out, expected)
    streamer = Recorder()
    with pytest.raises(ValueError, match="sliding attention window of 40"):
        specdec.generate(target, x, drafter=ModelDrafter(target), max_new_tokens=11, streamer=streamer)
    assert streamer.tokens == [] and streamer.ended  # refused before anything was generated; the consumer released


# ---------------------------------------------------------------- what generate() returns


def test_returned_sequences_are_ordinary_tensors(llama):
    x = prompt()
    out = specdec.generate(llama, x, drafter=NGramDrafter(), max_new_tokens=8)
    out[0, 0] = 1  # an inference tensor would raise here
    assert not out.is_inference() and not out.requires_grad
    full = specdec.generate(llama, x, drafter=NGramDrafter(), max_new_tokens=8, return_dict_in_generate=True)
    full.sequences[0, 0] = 1
    assert not full.sequences.is_inference()


class Recorder:
    def __init__(self):
        self.tokens, self.ended = [], False

    def put(self, value):
        self.tokens += value.flatten().tolist()

    def end(self):
        self.ended = True


class Failing(NGramDrafter):
    """Drafts normally, then raises on its fifth proposal."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def propose(self, state):
        self.calls += 1
        if self.calls == 5:
            raise RuntimeError("the draft source broke")
        return super().propose(state)


def test_an_exception_inside_generation_ends_the_streamer_and_propagates(llama):
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / BUILTIN_DRAFT)
    streamer = TextIteratorStreamer(tokenizer, timeout=30)
    errors = []

    def produce():
        try:
            specdec.generate(llama, prompt(), drafter=Failing(), controller=None, max_new_tokens=40, streamer=streamer)
        except RuntimeError as error:
            errors.append(error)

    thread = threading.Thread(target=produce)
    thread.start()
    list(streamer)  # returns once the streamer is ended; a queue.Empty after 30 s would fail the test
    thread.join()
    assert len(errors) == 1 and "broke" in str(errors[0])


def test_a_generator_keeps_bounded_state_over_many_calls(llama):
    gen = specdec.SpeculativeGenerator(llama, ModelDrafter(llama))
    sizes = []
    for call in range(30):
        out = gen.generate(prompt(call), max_new_tokens=12, eos_token_id=None, return_dict_in_generate=True)
        assert len(out.spec_stats.plans) == len(out.spec_stats.accept_lengths)  # the call's decisions, in its output
        sizes.append(len(pickle.dumps(gen.controller)))
    assert not hasattr(gen.controller, "history")
    assert max(sizes[10:]) <= sizes[9] + 256  # 20 more calls of ~8 steps each: a list per step would add kilobytes


def test_out_of_vocabulary_and_negative_ids_are_refused(llama):
    for bad in (VOCAB, VOCAB + 5, -1):
        x = prompt()
        x[0, 3] = bad
        with pytest.raises(ValueError, match=rf"vocabulary of {VOCAB} tokens: \[{bad}\]"):
            specdec.generate(llama, x, drafter=NGramDrafter(), max_new_tokens=4)


@pytest.mark.parametrize(
    "option, processor",
    [
        ({"renormalize_logits": True}, "LogitNormalization"),
        ({"remove_invalid_values": True}, "InfNanRemoveLogitsProcessor"),
        ({"repetition_penalty": 1.2}, "RepetitionPenaltyLogitsProcessor"),
        ({"min_new_tokens": 3}, "MinNewTokensLengthLogitsProcessor"),
        ({"do_sample": True, "typical_p": 0.9}, "TypicalLogitsWarper"),
        ({"suppress_tokens": [5]}, "SuppressTokensLogitsProcessor"),
    ],
)
def test_options_whose_logits_processing_is_not_reproduced_are_refused(llama, option, processor):
    with pytest.raises(NotImplementedError, match=processor):
        specdec.generate(llama, prompt(), drafter=NGramDrafter(), max_new_tokens=4, **option)


def test_sampling_warpers_and_greedy_only_options_are_accepted(llama):
    x = prompt()
    sampled = dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9, min_p=0.01)
    assert specdec.generate(llama, x, drafter=NGramDrafter(), max_new_tokens=4, **sampled).shape == (1, 13)
    # typical_p only applies when sampling; target.generate ignores it in greedy decoding, and so does specdec
    out, expected = greedy(llama, NGramDrafter(), x, n=6, typical_p=0.9)
    assert torch.equal(out, expected)


def test_stop_strings_stop_where_target_generate_stops():
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / BUILTIN_DRAFT)
    target = tiny_model("llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64)
    x = tokenizer("The weather today is", return_tensors="pt").input_ids
    plain = target.generate(x, max_new_tokens=24, do_sample=False, eos_token_id=None)
    text = tokenizer.decode(plain[0, x.shape[1] :])
    stop = text[len(text) // 2 : len(text) // 2 + 3]  # three characters from the middle of the answer
    kwargs = dict(max_new_tokens=24, do_sample=False, eos_token_id=None, stop_strings=[stop], tokenizer=tokenizer)
    expected = target.generate(x, **kwargs)
    assert expected.shape[1] < plain.shape[1]  # the stop string cut the answer short
    for drafter in (NGramDrafter(), ModelDrafter(target, depth=4, branching=2, tree_budget=6)):
        assert torch.equal(specdec.generate(target, x, drafter=drafter, **kwargs), expected)
    with pytest.raises(ValueError, match="tokenizer"):
        specdec.generate(target, x, drafter=NGramDrafter(), max_new_tokens=4, stop_strings=[stop])


def test_no_deprecation_warnings_from_our_own_calls(llama):
    heads = __import__("heads").MedusaHeads.for_model(llama, num_heads=2)
    drafters = [ModelDrafter(tiny_model("llama", seed=1)), NGramDrafter(memory=NGramMemory()), MedusaDrafter(heads)]
    messages = []
    handler = type("H", (__import__("logging").Handler,), {"emit": lambda self, r: messages.append(r.getMessage())})()
    hf_logging.get_logger().addHandler(handler)
    hf_logging.reset_warning_once_cache() if hasattr(hf_logging, "reset_warning_once_cache") else None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for drafter in drafters:
                specdec.generate(llama, prompt(), drafter=drafter, max_new_tokens=12, eos_token_id=None)
    finally:
        hf_logging.get_logger().removeHandler(handler)
    deprecations = [str(w.message) for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    assert deprecations == [] and not [m for m in messages if "deprecated" in m]


# ---------------------------------------------------------------- found by reading the code


def test_catch_up_after_plain_steps_is_timed_apart_from_drafting(llama):
    draft = tiny_model("llama", seed=1)
    drafter = ModelDrafter(draft)
    drafter.start(llama)
    x = prompt(length=40)
    drafter.propose(DecodeState(x[:, :2], max_depth=2))
    drafter.commit(specdec.acceptance.Acceptance(path=[0], tokens=[int(x[0, 2])]))
    drafter.propose(DecodeState(x[:, :3], max_depth=2))  # the step after: only the new root to read
    assert drafter.catchup_time == 0.0
    drafter.commit(specdec.acceptance.Acceptance(path=[0], tokens=[int(x[0, 3])]))
    drafter.propose(DecodeState(x, max_depth=2))  # 37 tokens accepted while it was not asked
    assert drafter.catchup_time > 0.0

    charged, caught_up = [], []

    class Recording(Controller):
        def update(self, plan, size, depth, accepted, promised, draft_seconds, verify_seconds, catchup_seconds):
            charged.append(draft_seconds)
            caught_up.append(catchup_seconds)
            super().update(plan, size, depth, accepted, promised, draft_seconds, verify_seconds, catchup_seconds)

    controller = Recording(ControlConfig(warmup_steps=1, probe_after=4))
    out = specdec.generate(
        llama, x, drafter=ModelDrafter(draft), controller=controller, max_new_tokens=60, eos_token_id=None,
        return_dict_in_generate=True,
    )  # fmt: skip
    stats = out.spec_stats
    assert stats.fallback_steps > 0 and stats.catchup_time > 0  # a random draft: fallback, then probes catch up
    assert sum(charged) == pytest.approx(stats.draft_time - stats.catchup_time, abs=1e-6)
    assert sum(caught_up) == pytest.approx(stats.catchup_time, abs=1e-6)  # charged to the probes, apart
    assert controller.probe_cost > 0


def test_controller_keeps_what_it_learnt_and_starts_each_call_afresh():
    c = Controller(ControlConfig(probe_after=4))
    c.streak, c.plain_left, c.backoff = 1, 100, 64
    c.costs.add_verify(1, 0.04)
    c.start()
    assert (c.streak, c.plain_left, c.backoff) == (0, 4, 32)  # the first probe soon, later ones as rare as half
    c.backoff = 6
    c.start()
    assert c.backoff == 4  # never below probe_after
    assert c.costs.samples  # measurements stay


def test_functional_generate_keeps_one_controller_per_drafter_and_target(llama):
    drafter, x = ModelDrafter(llama), prompt()
    first = specdec.generate(llama, x, drafter=drafter, max_new_tokens=10, return_dict_in_generate=True)
    second = specdec.generate(llama, x, drafter=drafter, max_new_tokens=10, return_dict_in_generate=True)
    other = specdec.generate(llama, x, drafter=ModelDrafter(llama), max_new_tokens=10, return_dict_in_generate=True)
    initial = ControlConfig().initial_threshold
    assert first.spec_stats.plans[0]["threshold"] == other.spec_stats.plans[0]["threshold"] == initial
    assert second.spec_stats.plans[0]["threshold"] != initial  # the first call's controller, with what it measured


def test_one_generator_called_from_several_threads(llama):
    gen = specdec.SpeculativeGenerator(llama, ModelDrafter(llama, depth=3))
    prompts = [prompt(seed) for seed in range(4)]
    expected = [llama.generate(x, max_new_tokens=16, do_sample=False, eos_token_id=None) for x in prompts]
    results = {}

    def work(i):
        results[i] = gen.generate(prompts[i], max_new_tokens=16, eos_token_id=None)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(torch.equal(results[i], expected[i]) for i in range(4))


def test_a_chain_is_fed_without_a_tree_mask(llama, monkeypatch):
    x, chain = prompt(length=20), TokenTree.chain(7, [8, 9, 10])
    with_mask = verify.forward_tree(llama, verify.prefill(llama, x)[0], TokenTree(chain.tokens, chain.parents + 0))
    monkeypatch.setattr(verify, "tree_attention_mask", lambda *a, **k: pytest.fail("a chain built a tree mask"))
    without = verify.forward_tree(llama, verify.prefill(llama, x)[0], chain)
    assert torch.allclose(with_mask.logits, without.logits, atol=1e-5)


def test_prefill_keeps_only_the_last_final_hidden_state(llama):
    x = prompt(length=12)
    seen = []
    hook = llama.register_forward_pre_hook(lambda _, args, kwargs: seen.append(kwargs), with_kwargs=True)
    try:
        _, hidden = verify.prefill(llama, x, output_hidden_states=True)
    finally:
        hook.remove()
    assert not seen[0].get("output_hidden_states")  # no tuple of every layer's states for the whole prompt
    reference = llama(x, output_hidden_states=True).hidden_states[-1][0, -1]
    assert hidden.shape == reference.shape and torch.allclose(hidden, reference, atol=1e-6)


def test_memory_adds_do_not_rebuild_the_index():
    gen = torch.Generator().manual_seed(0)
    memory = NGramMemory(capacity=20_000)
    memory.extend(torch.randint(0, 500, (400, 50), generator=gen).tolist())  # 20,000 tokens: at capacity
    memory.add(torch.randint(0, 500, (30,), generator=gen).tolist())  # over capacity: forgets down to 7/8
    assert len(memory) <= 17_500
    index = memory._entries
    for _ in range(49):  # 49 more small generations: into the recent list, the big index untouched
        memory.add(torch.randint(0, 500, (30,), generator=gen).tolist())
    assert memory._entries is index and len(memory) <= 20_000
    fresh = NGramMemory()
    fresh.extend(memory.sequences())
    for context in torch.randint(0, 500, (50, 3), generator=gen).tolist():
        assert memory.match(context, 5) == fresh.match(context, 5)
