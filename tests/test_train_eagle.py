"""The EAGLE-3 training app on tiny models: the unrolled training-time test computes what drafting computes, the
target's side of a batch, training lowers the loss and raises held-out acceptance, and the trained head stays exact
and is accepted more."""

import pytest
import torch
from omegaconf import OmegaConf
from test_medusa import self_distilled_rows
from tiny import VOCAB, tiny_model

import specdec
from heads.eagle import EagleHead
from specdec import verify
from specdec.drafters import EagleDrafter
from training import train_eagle
from training.common import frozen_copy

STEPS = 3


def head_for(target, seed: int = 0, **kwargs) -> EagleHead:
    torch.manual_seed(seed)
    return EagleHead.for_model(target, **kwargs)


def test_unrolled_steps_are_what_drafting_a_chain_computes():
    target = tiny_model("llama")
    head = head_for(target).eval()
    tokens = torch.tensor([3, 9, 4, 17, 5, 6, 40, 7, 8, 30])
    with torch.no_grad(), verify.aux_hidden_states(target, head.config.layers) as aux:
        target(tokens[None])
    features, embed = aux[-1][0], target.get_input_embeddings()
    with torch.no_grad():
        outputs = train_eagle.unroll(head, embed(tokens), features, STEPS)
        assert [len(o) for o in outputs] == [9, 8, 7]
        for j in (0, 3, 6):
            cache = head.new_cache()  # the context: positions 0..j fed with the target's features
            hidden = head(embed(tokens[1 : j + 2]), head.project(features[: j + 1]), torch.arange(j + 1), cache)[-1]
            for k in range(1, STEPS):  # then a chain of drafted nodes: the true tokens, the head's own outputs
                visible = torch.ones(1, len(cache) + 1, dtype=torch.bool)  # the context, its ancestors, itself
                hidden = head(embed(tokens[j + 1 + k : j + 2 + k]), hidden[None], torch.tensor([j + k]), cache, visible)
                hidden = hidden[0]
                torch.testing.assert_close(outputs[k][j], hidden, rtol=1e-5, atol=1e-5)


def test_steps_from_a_start_position_are_the_same_outputs_and_the_same_loss(monkeypatch):
    target = tiny_model("llama")
    head = head_for(target, draft_vocab=list(range(0, 128, 3))).eval()
    row = {"prompt_ids": [3, 9, 4, 17, 5, 6, 40, 7, 8, 30, 11, 12], "answer_ids": [20, 21, 22, 23, 2]}
    side = train_eagle.target_side(target, [row], head.config.layers, head.draft_ids, pad=0)[0]
    embed = target.get_input_embeddings()
    start = train_eagle.first_position(side["answer"], STEPS)
    assert start == len(row["prompt_ids"]) - 1 - STEPS  # the prompt's first positions are read by step 0 only
    with torch.no_grad():
        whole = train_eagle.unroll(head, embed(side["tokens"]), side["features"], STEPS)
        part = train_eagle.unroll(head, embed(side["tokens"]), side["features"], STEPS, start)
        assert [len(o) for o in part] == [len(o) - start for o in whole]
        for k in range(STEPS):
            torch.testing.assert_close(part[k], whole[k][start:], rtol=1e-5, atol=1e-5)
        loss, stats = train_eagle.unrolled_loss(head, embed, side, head.t2d, STEPS, 0.8)
        monkeypatch.setattr(train_eagle, "first_position", lambda answer, steps: 0)
        loss_whole, stats_whole = train_eagle.unrolled_loss(head, embed, side, head.t2d, STEPS, 0.8)
    torch.testing.assert_close(loss, loss_whole, rtol=1e-5, atol=1e-6)
    assert stats == stats_whole and stats[0][1] == len(row["answer_ids"])


def test_target_side_reads_features_and_draft_vocabulary_logits():
    target = tiny_model("llama")
    head = head_for(target, draft_vocab=list(range(0, 128, 2)))
    rows = [{"prompt_ids": [5, 6, 7], "answer_ids": [8, 9]}, {"prompt_ids": [11], "answer_ids": [12, 13, 2]}]
    sides = train_eagle.target_side(target, rows, head.config.layers, head.draft_ids, pad=0)
    for row, side in zip(rows, sides, strict=True):
        sequence = torch.tensor([row["prompt_ids"] + row["answer_ids"]])
        with torch.no_grad(), verify.aux_hidden_states(target, head.config.layers) as aux:
            logits = target(sequence).logits[0]
        torch.testing.assert_close(side["features"], aux[-1][0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(side["logits"], logits[:, head.draft_ids], rtol=1e-4, atol=1e-5)
        assert side["tokens"].tolist() == sequence[0].tolist()
        start = len(row["prompt_ids"]) - 1  # the positions that predict answer tokens
        assert side["answer"].nonzero().flatten().tolist() == list(range(start, start + len(row["answer_ids"])))


def peaked_target():
    """A tiny target whose next-token distributions are peaked, as a trained model's are (a random one's are
    nearly flat, and soft labels then say little about its greedy token)."""
    target = tiny_model("llama")
    with torch.no_grad():
        target.lm_head.weight.mul_(30.0)
    return target


def tiny_cfg(**train) -> OmegaConf:
    return OmegaConf.create(
        {
            "seed": 0,
            "train": {
                "steps": STEPS, "step_decay": 0.8, "epochs": 30, "max_steps": None, "batch_size": 4, "lr": 3e-3,
                "warmup_steps": 5, "weight_decay": 0.0, "grad_accum": 1, "mixed_precision": "no",
                "checkpoint_every": 10_000, "log_every": 5, **train,
            },
        }
    )  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("eagle")
    target = peaked_target()
    rows = [{**r, "source": "tiny"} for r in self_distilled_rows(target, 24, seed=0)]
    heldout = [{**r, "source": "tiny"} for r in self_distilled_rows(target, 6, seed=1)]
    head = head_for(target).float()
    embed = frozen_copy(target.get_input_embeddings())
    before = train_eagle.acceptance(head, target, embed, heldout, STEPS, 0, 4)
    log = train_eagle.train(tiny_cfg(), head, target, embed, rows, 0, tmp_path / "ckpt")
    after = train_eagle.acceptance(head, target, embed, heldout, STEPS, 0, 4)
    return target, head.eval(), before, after, log


def test_training_lowers_the_loss_and_raises_held_out_acceptance(trained):
    _, _, before, after, log = trained
    assert log[-1]["loss"] < log[0]["loss"]
    assert set(after) == {"overall", "tiny"} and len(after["overall"]) == STEPS
    assert all(a > b + 0.2 for a, b in zip(after["overall"], before["overall"], strict=True)), (before, after)


def test_trained_head_stays_exact_and_is_accepted_more(trained, tmp_path):
    target, head, _, _, _ = trained
    head.save_pretrained(tmp_path)
    loaded = EagleHead.from_pretrained(tmp_path, target)
    prompts = torch.randint(3, VOCAB, (4, 6), generator=torch.Generator().manual_seed(7))  # like the training prompts
    accepted = {}
    for name, h in [("trained", loaded), ("untrained", head_for(target, seed=3).eval())]:
        steps = tokens = 0
        for prompt in prompts:
            expected = target.generate(prompt[None], max_new_tokens=24, do_sample=False, eos_token_id=None)
            gen = specdec.SpeculativeGenerator(target, EagleDrafter(h, depth=STEPS, branching=2, tree_budget=8), None)
            out = gen.generate(prompt[None], max_new_tokens=24, eos_token_id=None, return_dict_in_generate=True)
            assert out.sequences.tolist() == expected.tolist()
            steps, tokens = steps + len(out.spec_stats.accept_lengths), tokens + 24
        accepted[name] = tokens / steps
    assert accepted["trained"] > accepted["untrained"] + 0.3, accepted
