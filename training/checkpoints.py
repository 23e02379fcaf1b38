"""Resumable training: accelerate's full state plus the batch count and the log, written together.

Under `accelerate launch` every process saves and loads the state (accelerate writes the model and optimizer from
the main process, and each process's RNG state); only the main process writes the batch count."""

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
    accelerator.print(f"resuming after batch {state['batch']}")
    return state["batch"], state["log"]


def save_checkpoint(accelerator: Accelerator, ckpt_dir: Path, batch: int, log: list[dict]) -> None:
    """Model, optimizer, scheduler and RNG states, then the batch count (written last: a checkpoint counts
    only once complete)."""
    accelerator.save_state(str(ckpt_dir / "state"))
    accelerator.wait_for_everyone()  # every process's part of the state is written
    if accelerator.is_main_process:
        (ckpt_dir / "latest.json").write_text(json.dumps({"batch": batch, "log": log}))
