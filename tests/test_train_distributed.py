"""`training.train_medusa` under `accelerate launch` with 2 CPU processes (gloo): smoke-size data on a tiny target.
Each process trains on its half of every batch, so equal heads at the end mean the gradients were synchronised;
only the main process writes files; a second launch resumes from the first one's checkpoint."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import tiny_model
from transformers import AutoTokenizer

from specdec.models import ASSETS, BUILTIN_DRAFT

ROOT = Path(__file__).resolve().parents[1]
DIGEST = re.compile(r"process (\d) of 2: heads sha256 ([0-9a-f]{64})")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(base: Path, max_steps: int) -> str:
    """One `accelerate launch` of the app on 2 CPU processes; its stdout and stderr."""
    overrides = [
        f"target={base / 'model'}", f"data_dir={base / 'data'}", f"data_cache={base / 'cache'}",
        f"work_dir={base / 'work'}", f"output_dir={base / 'heads'}",
        "~data.sources", "+data.sources={prompts.jsonl:16}", "~data.t0", "data.dialogs=0", "data.translation=0",
        "data.self_prompts=0", "data.reuse_answers=[]", "data.heldout=4",
        "data.max_new_tokens=16", "data.gen_batch_size=8",
        "data.gen_dtype=fp32", "device=cpu", "medusa.num_heads=2", "medusa.draft_vocab=64", "medusa.tree_budget=4",
        "medusa.tree_topk=2", "train.mixed_precision=no", "train.batch_positions=32", f"train.max_steps={max_steps}",
        "train.checkpoint_every=2", "train.log_every=2", "train.warmup_steps=1",
    ]  # fmt: skip
    # accelerate 1.16 starts several CPU processes through torchrun only with --multi_gpu (with --cpu: one process,
    # unless given an MPI hostfile); the app then sees device=cpu and joins them with gloo
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += ["--main_process_port", str(free_port())]
    command += ["-m", "training.train_medusa", *overrides]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-8000:]
    return output


@pytest.fixture(scope="module")
def launches(tmp_path_factory) -> tuple[Path, str, str]:
    """(directory, output of a 4-step run, output of a second run to 6 steps that resumes it)."""
    base = tmp_path_factory.mktemp("train_distributed")
    tiny_model("llama", vocab_size=49152).save_pretrained(base / "model")  # the tokenizer's vocabulary
    AutoTokenizer.from_pretrained(ASSETS / BUILTIN_DRAFT).save_pretrained(base / "model")
    (base / "data").mkdir()
    prompts = [{"instruction": f"Count from {i} to {i + 5}, then name colour number {i}."} for i in range(16)]
    (base / "data" / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    return base, launch(base, max_steps=4), launch(base, max_steps=6)


def digests(output: str) -> dict[int, str]:
    return {int(rank): digest for rank, digest in DIGEST.findall(output)}


def test_both_processes_end_with_the_same_heads(launches):
    _, first, resumed = launches
    for output in (first, resumed):
        found = digests(output)
        assert set(found) == {0, 1} and found[0] == found[1], output[-3000:]
    assert digests(first)[0] != digests(resumed)[0]  # the second launch trained on


def test_only_the_main_process_writes(launches):
    base, first, _ = launches
    assert first.count("heads written to") == 1
    assert first.count("training positions cached") == 1
    metrics = json.loads((base / "heads" / "metrics.json").read_text())
    assert metrics["num_processes"] == 2 and metrics["train_positions"] > 0
    state = base / "work" / "checkpoints" / "state"  # accelerate's: one RNG state per process, the rest once
    assert sorted(p.name for p in state.iterdir()) == [
        "model.safetensors", "optimizer.bin", "random_states_0.pkl", "random_states_1.pkl", "scheduler.bin",
    ]  # fmt: skip


def test_a_second_launch_resumes_from_the_checkpoint(launches):
    base, _, resumed = launches
    assert resumed.count("resuming after batch 4") == 1  # printed by the main process; both loaded the state
    log = json.loads((base / "work" / "train_log.json").read_text())
    assert [entry["batch"] for entry in log] == [2, 4, 6]
