"""The built-in target with the shipped draft and Medusa heads: greedy output identical to target.generate
(fp32)."""

import pytest
import torch

import specdec
from heads.medusa import BUILTIN_HEADS, MedusaHeads
from specdec.chat import chat_input_ids, load_questions
from specdec.drafters import MedusaDrafter, ModelDrafter
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


@pytest.mark.parametrize("index", [0, 2, 3])  # generic chat, alpaca instruction, gsm8k math
def test_greedy_output_identical_to_target_generate(real_pair, index):
    target, draft, tokenizer = real_pair
    question = load_questions(ASSETS / "demo_prompts.jsonl")[index]
    ids = chat_input_ids(tokenizer, [{"role": "user", "content": question["turns"][0]}])
    expected = target.generate(ids, max_new_tokens=40, do_sample=False)
    out = specdec.generate(
        target, ids, drafter=ModelDrafter(draft), controller=None, max_new_tokens=40, return_dict_in_generate=True
    )
    assert torch.equal(out.sequences, expected)
    assert out.spec_stats.mean_accepted_length > 1.0  # the distilled draft gets some tokens accepted


@pytest.mark.parametrize("index", [0, 3])
def test_shipped_medusa_heads_greedy_identical(real_pair, index):
    target, draft, tokenizer = real_pair
    heads = MedusaHeads.from_pretrained(BUILTIN_HEADS, target)
    question = load_questions(ASSETS / "demo_prompts.jsonl")[index]
    ids = chat_input_ids(tokenizer, [{"role": "user", "content": question["turns"][0]}])
    expected = target.generate(ids, max_new_tokens=40, do_sample=False)
    out = specdec.generate(
        target, ids, drafter=MedusaDrafter(heads), controller=None, max_new_tokens=40, return_dict_in_generate=True
    )
    assert torch.equal(out.sequences, expected)
    assert out.spec_stats.mean_accepted_length > 1.0
    with pytest.raises(ValueError, match="fingerprint"):  # the draft shares the target's embeddings: still refused
        MedusaHeads.from_pretrained(BUILTIN_HEADS, draft)
