"""Training data shared by the training apps: prompts from ../shared/data and the target's answers.

- `collect_prompts`: instruction, roleplay, tool-use, code and math prompts (never the dev question
  files or HumanEval, and nothing equal to a dev question), shuffled with a seed; optionally prompts the
  target writes itself (`self_prompts`: general chat requests from the chat template's user turn).
- `generate_answers`: the target's own greedy answers with its top-k log-probabilities (self-distillation
  data), in resumable JSONL shards; `teacher_forced_rows`: the target's top-k on human-written answers.
- `make_batches`, `collate`: length-bucketed batches and right-padded tensors with an answer mask.
- `resolve_device`: where the frozen target runs (`device: auto` in the configs: a GPU when there is one).
- `split_heldout`: training and held-out rows.
- `reproduce_command`: the command line an app's exported README gives to make its output again.

Rows are dicts: `prompt_ids`, `answer_ids`, `topk_ids`, `topk_logprobs`, `source`, `heldout`.
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import torch
from datasets import load_dataset
from omegaconf import DictConfig
from tqdm.auto import tqdm

from specdec.chat import chat_input_ids, load_questions

# ---------------------------------------------------------------- prompts and device


def resolve_device(name: str) -> torch.device:
    """`"auto"`: the first CUDA device when there is one, else the CPU; otherwise `torch.device(name)`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def reproduce_command(app: str, config_name: str, overrides: list[str]) -> str:
    """The command that runs training app `app` (its module under training/, whose default config has the
    same name) again: the run's config, named when it is another one (e.g. `finetune_medusa`), and its
    command-line overrides."""
    config = [] if config_name == app else ["--config-name", config_name]
    return " ".join([f".venv/bin/python -m training.{app}", *config, *overrides])


def split_heldout(rows: list[dict], heldout: int) -> tuple[list[dict], list[dict]]:
    """(training rows, held-out rows). Raises ValueError when nothing is left to train on."""
    train = [r for r in rows if not r["heldout"]]
    if not train:
        raise ValueError(
            f"all {len(rows)} conversations are held out (data.heldout={heldout}): lower data.heldout or use "
            f"more data (data.limit, data.max_generated_batches)"
        )
    return train, [r for r in rows if r["heldout"]]


def _prompt_text(row: dict) -> str:
    """The user message of one training example, whatever the source's field names."""
    if "question" in row:  # gsm8k
        return row["question"]
    text = row["instruction"]
    instance_input = row.get("input") or (row.get("instances") or [{}])[0].get("input", "")
    return f"{text}\n\n{instance_input}" if instance_input else text


def _answer_text(row: dict) -> str:
    """The human-written answer of one training example (for teacher-forced distillation)."""
    if "answer" in row:  # gsm8k
        return row["answer"]
    if "response" in row:  # gpteacher
        return row["response"]
    return (row.get("instances") or [{}])[0].get("output", "")


def evaluation_prompts(cfg: DictConfig) -> set[str]:
    """Every turn of the dev question files: never trained on."""
    dev_files = sorted(Path(cfg.data_dir).glob("dev_*_question.jsonl"))
    return {turn.strip() for path in dev_files for q in load_questions(path) for turn in q["turns"]}


SELF_PROMPTS = "self_prompts"  # the source name of prompts the target wrote
T0_PROMPTS = "t0_prompts.jsonl.gz"  # P3 prompts: news summarization, reading comprehension, open QA, ...

SOURCE_TASKS = {  # the kind of request each prompt file holds (the mix is reported by these)
    "alpaca_seed_tasks.jsonl": "instructions",
    "self_instruct_user_oriented_252.jsonl": "instructions",
    "gpteacher_codegen_instruct.json": "code",
    "gpteacher_roleplay_instruct.json": "roleplay",
    "gpteacher_toolformer.json": "tool use",
    "gsm8k_train.jsonl": "math",
}


def t0_prompts(cfg: DictConfig, evaluation: set[str]) -> list[dict]:
    """`data.t0` (P3 task -> count): that many prompts of each task from `t0_prompts.jsonl.gz`, seeded.

    Its tasks: `summarization` (CNN/DailyMail train articles), `context_qa` (a question over a passage),
    `open_qa`, `generation`, `classification`.
    """
    wanted = dict(cfg.data.get("t0") or {})
    if not wanted:
        return []
    with gzip.open(Path(cfg.data_dir) / T0_PROMPTS, "rt") as f:
        rows = [json.loads(line) for line in f]
    unknown = set(wanted) - {r["task"] for r in rows}
    if unknown:
        raise ValueError(f"data.t0 names tasks {sorted(unknown)} that {T0_PROMPTS} does not have")
    prompts = []
    for task, count in wanted.items():
        texts = [r["prompt"] for r in rows if r["task"] == task and r["prompt"].strip() not in evaluation]
        random.Random(cfg.seed).shuffle(texts)
        prompts += [{"source": f"t0/{task}", "task": task, "text": t} for t in texts[:count]]
    return prompts


def collect_prompts(cfg: DictConfig, target=None, tokenizer=None) -> list[dict]:
    """Training prompts from the configured sources, minus anything equal to an evaluation question.

    `data.self_prompts` (a number of tries, 0 or absent: none) adds prompts the target writes itself
    (`self_prompts`, kept under `data_cache`, else `work_dir`); that needs `target` and `tokenizer`.
    """
    data_dir = Path(cfg.data_dir)
    evaluation = evaluation_prompts(cfg)
    prompts = []
    for name, count in cfg.data.sources.items():
        rows = load_dataset("json", data_files=str(data_dir / name), split="train")
        rows = rows.shuffle(seed=cfg.seed).select(range(min(count, len(rows))))
        task = SOURCE_TASKS.get(name, name)
        prompts += [
            {"source": name, "task": task, "text": t} for t in map(_prompt_text, rows) if t.strip() not in evaluation
        ]
    prompts += t0_prompts(cfg, evaluation)
    tries = cfg.data.get(SELF_PROMPTS) or 0
    if tries:
        if target is None or tokenizer is None:
            raise ValueError("data.self_prompts needs the target and its tokenizer: pass them to collect_prompts")
        cache = Path(cfg.get("data_cache") or cfg.work_dir) / SELF_PROMPTS
        texts = self_prompts(cfg, target, tokenizer, tries, cache)
        prompts += [
            {"source": SELF_PROMPTS, "task": "self-written chat", "text": t} for t in texts if t not in evaluation
        ]
    random.Random(cfg.seed).shuffle(prompts)
    return prompts[: cfg.data.limit] if cfg.data.limit else prompts


def self_prompts(cfg: DictConfig, target, tokenizer, tries: int, shard_dir: Path) -> list[str]:
    """User requests the target writes itself: its chat template up to the user's message is the prompt, and
    what the target samples there (until its end-of-turn token) is a request in its own chat distribution
    (the Magpie method). No data set needed, and it covers general chat, which the files here barely do.

    `tries` requests are sampled (`data.gen_batch_size` a shard, seeded per shard, resumable); kept are the
    finished ones (end-of-turn before `data.self_prompt_tokens`) of 3 to 200 words, each text once.

    Raises:
        ValueError: the tokenizer has no chat template (there is no user turn to start).
    """
    if tokenizer.chat_template is None:
        raise ValueError("data.self_prompts needs a chat model: the tokenizer has no chat template")
    marker = "\x00MESSAGE\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    prefix = tokenizer(text[: text.index(marker)], add_special_tokens=False).input_ids
    end_of_turn = tokenizer(text[text.index(marker) + len(marker) :], add_special_tokens=False).input_ids[0]
    size = cfg.data.gen_batch_size
    batches = [[{"prompt_ids": prefix, "shard": i // size}] * min(size, tries - i) for i in range(0, tries, size)]

    @torch.inference_mode()
    def write(batch: list[dict]) -> list[dict]:
        torch.manual_seed(cfg.seed * 1_000_003 + batch[0]["shard"])  # a resumed run writes the same shards
        input_ids = torch.tensor([prefix] * len(batch), device=target.device)
        out = target.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=True,
            temperature=cfg.data.get("self_prompt_temperature", 1.0),
            top_p=1.0,
            top_k=0,
            max_new_tokens=cfg.data.get("self_prompt_tokens", 128),
            eos_token_id=end_of_turn,
            pad_token_id=pad_id(tokenizer),
        )
        rows = []
        for row in out[:, len(prefix) :].tolist():
            finished = end_of_turn in row
            text = tokenizer.decode(row[: row.index(end_of_turn)] if finished else row, skip_special_tokens=True)
            rows.append({"text": text.strip(), "finished": finished})
        return rows

    seen, kept = set(), []
    for row in run_sharded(batches, shard_dir, "self-written prompts", write):
        if row["finished"] and 3 <= len(row["text"].split()) <= 200 and row["text"] not in seen:
            seen.add(row["text"])
            kept.append(row["text"])
    return kept


# ---------------------------------------------------------------- the target's answers


def generate_answers(cfg: DictConfig, target, tokenizer, prompts: list[dict], shard_dir: Path) -> list[dict]:
    """The target's greedy answer to every prompt: `{prompt_ids, answer_ids, topk_ids, topk_logprobs, ...}` rows.

    A prompt is `{"source", "text"}` (one user message) or `{"source", "messages"}` (a conversation that ends
    with the user's turn); its `task`, `conversation` and `heldout` (default: among the first `data.heldout`)
    are kept in its row. Prompts longer than `data.max_prompt_tokens` are left out.
    """
    pad = pad_id(tokenizer)
    rows = []
    for i, p in enumerate(prompts):
        messages = p.get("messages") or [{"role": "user", "content": p["text"]}]
        ids = chat_input_ids(tokenizer, messages)[0].tolist()
        if len(ids) <= cfg.data.max_prompt_tokens:
            extra = {k: p[k] for k in ("task", "conversation") if k in p}
            heldout = p.get("heldout", i < cfg.data.heldout)
            rows.append({"prompt_ids": ids, "source": p["source"], "heldout": heldout, **extra})
    rows.sort(key=lambda r: len(r["prompt_ids"]))  # similar lengths batch with little padding
    batches = [rows[i : i + cfg.data.gen_batch_size] for i in range(0, len(rows), cfg.data.gen_batch_size)]
    batches = batches[: cfg.data.max_generated_batches]  # shortest prompts first; generation is the slow stage

    known = known_answers([Path(d) for d in cfg.data.get("reuse_answers") or []])

    def answer(batch: list[dict]) -> list[dict]:
        missing = [r["prompt_ids"] for r in batch if tuple(r["prompt_ids"]) not in known]
        made = iter(_generate_batch(target, missing, pad, tokenizer.eos_token_id, cfg) if missing else [])
        return [known.get(tuple(r["prompt_ids"])) or next(made) for r in batch]

    return run_sharded(batches, shard_dir, "target answers", answer)


ANSWER_FIELDS = ("answer_ids", "topk_ids", "topk_logprobs")


def known_answers(shard_dirs: list[Path]) -> dict[tuple[int, ...], dict]:
    """Answers already generated (by this config or another, e.g. a smaller data set), by prompt ids, from the
    shards in `shard_dirs` and their subfolders: a config that adds prompts to an earlier one generates only
    the new prompts' answers. Shards kept without the top-k fields (only Medusa-2 and draft distillation read
    them) give answers without them."""
    known = {}
    for shard in sorted(p for d in shard_dirs for p in d.rglob("*.jsonl")):
        for line in shard.open():
            row = json.loads(line)
            known[tuple(row["prompt_ids"])] = {k: row[k] for k in ANSWER_FIELDS if k in row}
    return known


@torch.inference_mode()
def _generate_batch(target, prompts: list[list[int]], pad: int, eos: int, cfg: DictConfig) -> list[dict]:
    """Greedy answers, with the target's top-k log-probabilities at every answer position (the KD signal)."""
    width = max(map(len, prompts))
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=target.device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=target.device)
    out = target.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=cfg.data.max_new_tokens,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
    )
    top = [torch.log_softmax(s.float(), -1).topk(cfg.data.topk, dim=-1) for s in out.logits]  # per step: [B, k]
    top_lp, top_ids = (torch.stack(parts, 1).cpu() for parts in zip(*top, strict=True))  # [B, T, k]
    answers = []
    for i, row in enumerate(out.sequences[:, width:].tolist()):
        end = row.index(eos) + 1 if eos in row else len(row)  # keep the EOS: the draft must predict it too
        answers.append(
            {
                "answer_ids": row[:end],
                "topk_ids": top_ids[i, :end].tolist(),
                "topk_logprobs": top_lp[i, :end].half().tolist(),
            }
        )
    return answers


def teacher_forced_rows(cfg: DictConfig, target, tokenizer, shard_dir: Path) -> list[dict]:
    """The target's top-k log-probabilities on human-written answers: one batched forward, no generation.

    A cheaper second signal beside the target's own answers (about 5x more tokens per second on this CPU).
    Rows have the same format as `generate_answers`'s, none held out.
    """
    evaluation = evaluation_prompts(cfg)
    rows = []
    for name, count in (cfg.data.get("teacher_forced") or {}).items():
        data = load_dataset("json", data_files=str(Path(cfg.data_dir) / name), split="train")
        data = data.shuffle(seed=cfg.seed + 1).select(range(min(count, len(data))))
        for example in data:
            prompt, answer = _prompt_text(example), _answer_text(example)
            if prompt.strip() in evaluation or not answer.strip():
                continue
            prompt_ids = chat_input_ids(tokenizer, [{"role": "user", "content": prompt}])[0].tolist()
            answer_ids = tokenizer(answer, add_special_tokens=False).input_ids[: cfg.data.max_new_tokens - 1]
            if len(prompt_ids) <= cfg.data.max_prompt_tokens:
                rows.append(
                    {
                        "prompt_ids": prompt_ids,
                        "answer_ids": [*answer_ids, tokenizer.eos_token_id],
                        "source": f"{name} (teacher-forced)",
                        "heldout": False,
                    }
                )
    rows.sort(key=lambda r: len(r["prompt_ids"]) + len(r["answer_ids"]))
    batches = [rows[i : i + cfg.data.forced_batch_size] for i in range(0, len(rows), cfg.data.forced_batch_size)]
    pad = pad_id(tokenizer)
    return run_sharded(batches, shard_dir, "teacher-forced top-k", lambda batch: _teacher_topk(target, batch, pad, cfg))


@torch.inference_mode()
def _teacher_topk(target, batch: list[dict], pad: int, cfg: DictConfig) -> list[dict]:
    input_ids, attention_mask, loss_mask = (t.to(target.device) for t in collate(batch, pad))
    logits = target(input_ids=input_ids, attention_mask=attention_mask).logits  # [B, T, V]
    out = []
    for i in range(len(batch)):
        top_lp, top_ids = torch.log_softmax(logits[i][loss_mask[i]].float(), -1).topk(cfg.data.topk, dim=-1)
        out.append({"topk_ids": top_ids.tolist(), "topk_logprobs": top_lp.half().tolist()})
    return out


def run_sharded(batches: list[list[dict]], shard_dir: Path, desc: str, make) -> list[dict]:
    """Extend every row of each batch with `make(batch)` (one dict per row), one JSONL shard per batch.

    A shard is written atomically, so it exists only once complete: an interrupted run redoes just the
    batch it was in. Returns the rows of these batches' shards.

    Raises:
        ValueError: an existing shard was made from other prompts (another config wrote this directory).
    """
    shard_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for index, batch in enumerate(tqdm(batches, desc=desc, unit="batch")):
        shard = shard_dir / f"{index:05d}.jsonl"
        if not shard.exists():
            rows = [{**r, **extra} for r, extra in zip(batch, make(batch), strict=True)]
            tmp = shard.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
            tmp.rename(shard)
        rows = [json.loads(line) for line in shard.open()]
        if [r["prompt_ids"] for r in rows] != [r["prompt_ids"] for r in batch]:
            raise ValueError(
                f"{shard} was made from other prompts than this config's; point the data directory elsewhere "
                f"or delete {shard_dir}"
            )
        out += rows
    return out


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


# ---------------------------------------------------------------- batches


def make_batches(rows: list[dict], batch_size: int, seed: int) -> list[list[dict]]:
    """Length-bucketed batches in a seeded random order."""
    rows = sorted(rows, key=lambda r: len(r["prompt_ids"]) + len(r["answer_ids"]))
    batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    random.Random(seed).shuffle(batches)
    return batches


def collate(batch: list[dict], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded `input_ids` and `attention_mask` `[B, T]`, and `loss_mask` (positions predicting answers)."""
    seqs = [r["prompt_ids"] + r["answer_ids"] for r in batch]
    width = max(map(len, seqs))
    input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
    attention_mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    loss_mask = torch.zeros_like(attention_mask, dtype=torch.bool)
    for i, r in enumerate(batch):
        start = len(r["prompt_ids"]) - 1  # the last prompt position predicts the first answer token
        loss_mask[i, start : start + len(r["answer_ids"])] = True
    return input_ids, attention_mask, loss_mask
