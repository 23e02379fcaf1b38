"""Shared training data: resumable shards that refuse to be mixed with another config's."""

import pytest

from training.data import collate, run_sharded


def test_run_sharded_resumes_and_returns_only_its_batches(tmp_path):
    calls = []

    def make(batch):
        calls.append(len(batch))
        return [{"answer_ids": [sum(r["prompt_ids"])]} for r in batch]

    batches = [[{"prompt_ids": [1, 2]}, {"prompt_ids": [3]}], [{"prompt_ids": [4]}]]
    rows = run_sharded(batches, tmp_path, "test", make)
    assert [r["answer_ids"] for r in rows] == [[3], [3], [4]] and calls == [2, 1]
    assert run_sharded(batches, tmp_path, "test", make) == rows and calls == [2, 1]  # nothing redone
    assert run_sharded(batches[:1], tmp_path, "test", make) == rows[:2]  # not the other batch's shard


def test_run_sharded_refuses_shards_made_from_other_prompts(tmp_path):
    run_sharded([[{"prompt_ids": [1]}]], tmp_path, "test", lambda b: [{"answer_ids": [0]}])
    with pytest.raises(ValueError, match="other prompts"):
        run_sharded([[{"prompt_ids": [2]}]], tmp_path, "test", lambda b: [{"answer_ids": [0]}])


def test_collate_masks_the_positions_that_predict_answer_tokens():
    input_ids, attention_mask, loss_mask = collate(
        [{"prompt_ids": [5, 6], "answer_ids": [7, 8]}, {"prompt_ids": [5], "answer_ids": [9]}], pad=0
    )
    assert input_ids.tolist() == [[5, 6, 7, 8], [5, 9, 0, 0]]
    assert attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert loss_mask.tolist() == [[False, True, True, False], [True, False, False, False]]
