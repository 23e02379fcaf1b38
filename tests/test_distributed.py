"""Two processes decoding together (gloo on the CPU, torchrun): a tensor-parallel target (`tp_plan="auto"`) and
replicated targets in `specdec.distributed.lockstep`. Every rank must draft the same trees and produce the same
tokens as plain `generate`, although rank 1's clock says its drafting is slower: the controller's plans (and with
them the drafters' thresholds), Composite's skip accounting, the sampling seed and stopping criteria all come from
rank 0. The ranks run `distributed_worker.py`; this test compares what they wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import small_draft, tiny_model

from specdec import distributed
from specdec.tree import TokenTree

ROOT = Path(__file__).resolve().parents[1]
DRAFTERS = ("ngram", "model", "composite", "medusa", "eagle")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Both ranks' results, from one run of the worker for the module (bounded: 60 s; it took 26 s in the full suite
    on 2 shared cores, 43 s at a load average of 7)."""
    base = tmp_path_factory.mktemp("distributed")
    tiny_model("llama").save_pretrained(base / "target")
    small_draft("llama").save_pretrained(base / "draft")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [str(ROOT / "tests" / "distributed_worker.py"), str(base), str(base)]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    return [json.loads((base / f"rank{r}.json").read_text()) for r in range(2)]


def test_target_is_sharded(ranks):
    for result in ranks:  # tensor parallelism ran: each rank holds half of q_proj's 64 output rows
        assert result["tensor_parallel"]["sharded"] == "DTensor"
        assert result["tensor_parallel"]["local_q_rows"] == 32


@pytest.mark.parametrize("name", DRAFTERS)
def test_tensor_parallel_ranks_agree_and_equal_plain_generate(ranks, name):
    first, second = (result["tensor_parallel"] for result in ranks)
    assert first[name]["tokens"] == first["plain"]
    assert second[name] == first[name]  # tokens, every plan, tree sizes, accepted lengths (and Composite's ledgers)


def test_tensor_parallel_sampling_and_stopping_follow_rank_zero(ranks):
    first, second = (result["tensor_parallel"] for result in ranks)
    assert second["sampled"] == first["sampled"]  # different global seeds, rank 0's generator seed
    assert second["stopped"] == first["stopped"]  # rank 1's criterion would stop after 3 tokens, rank 0's after 10
    assert len(first["stopped"]["tokens"]) - 24 == 10


def test_ranks_that_draft_different_trees_fail_clearly(ranks):
    for result in ranks:  # rank 1 cut its n-gram trees to one level: both ranks raise before verifying
        assert "the ranks drafted different trees" in result["tensor_parallel"]["disagreeing"]


def test_rank_one_is_slower(ranks):
    """The check is not vacuous: replicated models on their own clocks decide differently (rank 1's draft model
    costs 30 ms more per proposal), the same ranks in lockstep decide the same."""
    first, second = (result["replicated"] for result in ranks)
    assert first["own_clocks"]["plans"] != second["own_clocks"]["plans"]
    assert second["lockstep"] == first["lockstep"]
    assert first["lockstep"]["tokens"] == first["own_clocks"]["tokens"] == second["own_clocks"]["tokens"]


def test_single_process_is_untouched():
    """Outside lockstep, or without torch.distributed, nothing is broadcast."""
    assert distributed.active_group() is None
    assert distributed.rank_zero(1.5, 2.0) == (1.5, 2.0)
    with distributed.lockstep(torch.distributed.group.WORLD):  # not initialised: a no-op
        assert distributed.rank_zero(3.0) == (3.0,)
        assert distributed.rank_zero_int(2**62 + 1) == 2**62 + 1
        distributed.check_same_tree(TokenTree.chain(1, [2, 3]))  # nothing to compare with
    assert distributed.tensor_parallel_group(tiny_model("llama")) is None
