"""The built-in target with the shipped draft, Medusa heads and n-gram memory: greedy output identical to
target.generate (fp32)."""

import pytest
import torch

import specdec
from heads.medusa import BUILTIN_HEADS, MedusaHeads
from specdec.chat import chat_input_ids, load_questions
from specdec.devices import is_offloaded
from specdec.drafters import MedusaDrafter, ModelDrafter, NGramDrafter, NGramMemory
from specdec.drafters.memory import BUILTIN_MEMORY
from specdec.models import ASSETS, BUILTIN_DRAFT, BUILTIN_TARGET, load_model

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def real_pair():
    target, tokenizer = load_model(BUILTIN_TARGET, dtype="fp32")
    draft, _ = load_model(BUILTIN_DRAFT, dtype="fp32")
    return target, draft, tokenizer


def test_builtin_pair_shares_the_vocabulary(real_pair):
    target, draft, tokenizer = real_pair
    assert target.config.vocab_size == draft.config.vocab_size == len(tokenizer) == 49152
    assert target.config.num_hidden_layers == 30
    # per-token cost comes from depth: 2 of the target's 30 layers (its parameters are mostly the embeddings)
    assert draft.config.num_hidden_layers * 10 <= target.config.num_hidden_layers
    # the GGUF file is dequantized on load: plain Linear layers in the requested dtype
    assert type(target.model.layers[0].mlp.up_proj) is torch.nn.Linear
    assert target.model.layers[0].mlp.up_proj.weight.dtype == torch.float32


def drafter_for(name: str, target, draft):
    if name == "ngram_memory":
        return NGramDrafter(memory=BUILTIN_MEMORY, remember=False)
    return ModelDrafter(draft) if name == "draft" else MedusaDrafter(MedusaHeads.from_pretrained(BUILTIN_HEADS, target))


# generic chat, alpaca instruction, gsm8k math with the distilled draft; chat and math with the Medusa heads
# and with the n-gram source drafting from the shipped memory of the target's answers to other prompts
@pytest.mark.parametrize(
    ("source", "index"),
    [("draft", 0), ("draft", 2), ("draft", 3), ("medusa", 0), ("medusa", 3), ("ngram_memory", 0), ("ngram_memory", 3)],
)
def test_greedy_output_identical_to_target_generate(real_pair, source, index):
    target, draft, tokenizer = real_pair
    question = load_questions(ASSETS / "demo_prompts.jsonl")[index]
    ids = chat_input_ids(tokenizer, [{"role": "user", "content": question["turns"][0]}])
    expected = target.generate(ids, max_new_tokens=40, do_sample=False)
    drafter = drafter_for(source, target, draft)
    out = specdec.generate(
        target, ids, drafter=drafter, controller=None, max_new_tokens=40, return_dict_in_generate=True
    )
    assert torch.equal(out.sequences, expected)
    assert out.spec_stats.mean_accepted_length > 1.0  # the draft source gets some tokens accepted


def test_shipped_medusa_heads_refuse_another_model(real_pair):
    with pytest.raises(ValueError, match="fingerprint"):  # the draft shares the target's embeddings: still refused
        MedusaHeads.from_pretrained(BUILTIN_HEADS, real_pair[1])


def test_shipped_ngram_memory_refuses_another_model(real_pair):
    memory = NGramMemory.from_pretrained(BUILTIN_MEMORY)
    memory.check(real_pair[0])  # the target whose answers it holds
    with pytest.raises(ValueError, match="fingerprint"):
        memory.check(real_pair[1])


def test_the_builtin_target_offloaded_to_disk_gives_the_same_tokens(real_pair, tmp_path):
    """transformers cannot map a GGUF file to disk; `load_model` offloads the loaded model whole instead. Every
    weight is then read at each forward, and the shipped heads' fingerprint check still reads them."""
    target, _, tokenizer = real_pair
    with pytest.raises(ValueError, match="offload_folder"):
        load_model(BUILTIN_TARGET, device_map={"": "disk"})
    offloaded, _ = load_model(BUILTIN_TARGET, dtype="fp32", device_map={"": "disk"}, offload_folder=tmp_path)
    assert is_offloaded(offloaded) and any(tmp_path.iterdir())
    question = load_questions(ASSETS / "demo_prompts.jsonl")[3]
    ids = chat_input_ids(tokenizer, [{"role": "user", "content": question["turns"][0]}])
    expected = target.generate(ids, max_new_tokens=16, do_sample=False)
    drafter = MedusaDrafter(MedusaHeads.from_pretrained(BUILTIN_HEADS, offloaded))
    out = specdec.generate(offloaded, ids, drafter=drafter, max_new_tokens=16, return_dict_in_generate=True)
    assert torch.equal(out.sequences, expected) and max(out.spec_stats.tree_sizes) > 1
