"""Resumable training: accelerate's full state plus the batch count and the log, written together."""

from __future__ import annotations

import json
from pathlib import Path

from accelerate import Accelerator


def resume(accelerator: Accelerator, ckpt_dir: Path) -> tuple[int, list[dict]]:
    """Load the newest checkpoint in `ckpt_dir`, if any: (batches done, log so far)."""
    latest = ckpt_dir / "latest.json"
    if not latest.exists():
        return 0, []
    state = json.loads(latest.read_text())
    accelerator.load_state(str(ckpt_dir / "state"))
    print(f"resuming after batch {state['batch']}")
    return state["batch"], state["log"]


def save_checkpoint(accelerator: Accelerator, ckpt_dir: Path, batch: int, log: list[dict]) -> None:
    """Model, optimizer, scheduler and RNG states, then the batch count (written last: a checkpoint counts
    only once complete)."""
    accelerator.save_state(str(ckpt_dir / "state"))
    (ckpt_dir / "latest.json").write_text(json.dumps({"batch": batch, "log": log}))
