"""Prompt sources: GSM8K (hub or local jsonl) and a synthetic arithmetic task.

Every task yields rows ``{"question", "answer", "gold"}``: ``answer`` is a worked
solution ending in ``#### N`` (GSM8K's own format, which the SFT mode trains on and
the rewards grade against) and ``gold`` is ``N`` as a plain string. Prompts are
rendered separately (``render_prompt``) so that the instruction and the chat
template can change without touching the data.

``PromptSampler`` draws prompts in a seeded order, a fresh permutation per epoch, and
its state is two integers, so a resumed run continues with exactly the prompts the
crashed one would have seen next.
"""
from __future__ import annotations

import json
import logging
import lzma
import os
import random
import socket
from dataclasses import dataclass
from pathlib import Path

ENV_DIR = "PLACERL_GSM8K_DIR"
HUB_ID = "openai/gsm8k"

log = logging.getLogger("placerl")


class DataError(ValueError):
    """A dataset problem, described in one line (file, line, what is wrong)."""


def parse_gold(answer: str) -> str:
    """The final answer after GSM8K's ``####`` marker, without thousands separators."""
    if "####" not in answer:
        raise DataError("answer has no '#### N' line")
    gold = answer.rsplit("####", 1)[1].strip().replace(",", "")
    if not gold:
        raise DataError("answer has an empty '####' line")
    return gold


def read_gsm8k_jsonl(path: str | Path) -> list[dict]:
    """Rows of a GSM8K jsonl file; a bad line fails naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"GSM8K file {str(path)!r} does not exist; set data.path or ${ENV_DIR} "
                        "to a folder with train.jsonl and test.jsonl")
    rows = []
    opener = lzma.open if path.suffix == ".xz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                question, answer = obj["question"], obj["answer"]
                gold = parse_gold(answer)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            except KeyError as e:
                raise DataError(f"{path}:{lineno}: missing field {e.args[0]!r} "
                                "(GSM8K rows need 'question' and 'answer')") from None
            except DataError as e:
                raise DataError(f"{path}:{lineno}: {e}") from None
            rows.append({"question": question, "answer": answer, "gold": gold})
    if not rows:
        raise DataError(f"GSM8K file {str(path)!r} holds no rows")
    return rows


def load_gsm8k(split: str, path: str = "") -> list[dict]:
    """GSM8K ``split`` ('train' or 'test') from a folder/file, ``$PLACERL_GSM8K_DIR``, the hub,
    or, when the hub cannot be reached, the copy shipped in the package (``rl/bundled``)."""
    path = path or os.environ.get(ENV_DIR, "")
    if path:
        p = Path(path).expanduser()
        if p.is_dir():
            p = p / f"{split}.jsonl"
            if not p.exists() and p.with_suffix(".jsonl.xz").exists():
                p = p.with_suffix(".jsonl.xz")
        return read_gsm8k_jsonl(p)
    reason = hub_unreachable()
    if not reason:
        from datasets import load_dataset  # the hub path: users with network access

        try:
            ds = load_dataset(HUB_ID, "main", split=split)
        except (ConnectionError, OSError) as e:  # reachable host, but the dataset did not come
            reason = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"[:120]
        else:
            log.info("GSM8K %s: %d rows from the hub (%s)", split, len(ds), HUB_ID)
            return [{"question": r["question"], "answer": r["answer"], "gold": parse_gold(r["answer"])} for r in ds]
    from rl.bundled import gsm8k_file

    if not gsm8k_file(split).exists():
        raise DataError(f"GSM8K is not reachable on the hub ({reason or 'offline'}) and this install has no "
                        f"shipped copy; set data.path or ${ENV_DIR} to a folder with train.jsonl and test.jsonl")
    rows = read_gsm8k_jsonl(gsm8k_file(split))
    log.info("GSM8K %s: %d rows from the copy shipped with placerl (%s; set data.path or $%s to use another)",
             split, len(rows), reason, ENV_DIR)
    return rows


def hub_unreachable(timeout_s: float = 3.0) -> str:
    """Why the dataset hub cannot be reached ("" when it can, or when offline mode is set:
    then ``datasets`` answers from its cache or fails at once).

    Asked before ``datasets`` is, which otherwise retries for about 25 s and prints each try.
    """
    if any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return ""
    host, _, port = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0].partition(":")
    try:
        socket.create_connection((host, int(port or 443)), timeout=timeout_s).close()
    except OSError:
        return f"{host} is unreachable"
    return ""


# ----------------------------------------------------------------------------- synthetic task

_NAMES = ["Ava", "Ben", "Chen", "Dana", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jade", "Kofi", "Lena"]
_ITEMS = ["apples", "marbles", "stickers", "books", "coins", "shells", "pencils", "cards"]


def _synthetic_problem(rng: random.Random, max_ops: int) -> dict:
    """One word problem with an exact integer answer and a worked solution."""
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    total = rng.randint(2, 20)
    sentences = [f"{name} has {total} {item}."]
    steps = []
    for _ in range(rng.randint(1, max_ops)):
        ops = ["+"] + (["-"] if total > 0 else []) + (["*"] if 0 < total <= 12 else [])
        op = rng.choice(ops)
        if op == "+":
            k = rng.randint(1, 20)
            sentences.append(f"Then {name} gets {k} more {item}.")
            new = total + k
        elif op == "-":
            k = rng.randint(1, total)
            sentences.append(f"Then {name} gives away {k} {item}.")
            new = total - k
        else:
            k = rng.randint(2, 4)
            sentences.append(f"Then the number of {item} {name} has becomes {k} times as large.")
            new = total * k
        steps.append(f"{total} {op} {k} = {new}")
        total = new
    question = " ".join(sentences) + f" How many {item} does {name} have now?"
    answer = "\n".join(steps) + f"\n#### {total}"
    return {"question": question, "answer": answer, "gold": str(total)}


def synthetic_arithmetic(n: int, seed: int, max_ops: int = 2) -> list[dict]:
    """``n`` generated problems; the same seed always gives the same problems."""
    rng = random.Random(seed)
    return [_synthetic_problem(rng, max_ops) for _ in range(n)]


# ----------------------------------------------------------------------------- prompts

def render_prompt(tokenizer, question: str, instruction: str, chat_template: bool = True) -> str:
    """The text the policy sees: the instruction and question, in the model's chat format."""
    content = f"{instruction}\n\n{question}" if instruction else question
    if chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    return content + "\n"


SPLITS = ("train", "val", "test")


def split_validation(rows: list[dict], val_size: int) -> tuple[list[dict], list[dict]]:
    """(train, val): the last ``val_size`` rows are held out for choosing hyperparameters."""
    if val_size < 0 or val_size >= len(rows):
        raise DataError(f"data.val_size={val_size} must be in [0, {len(rows)}) for a train split of "
                        f"{len(rows)} rows; lower it")
    return (rows[: len(rows) - val_size], rows[len(rows) - val_size:]) if val_size else (rows, [])


def load_task(data_cfg, split: str) -> list[dict]:
    """Rows of the configured task and split (``data_cfg`` is ``rl.config.DataConfig``).

    ``val`` is the last ``data.val_size`` rows of the train split, and ``train`` is the
    rest: whatever reads ``train`` (the sampler, placement probes) never sees a val row.
    """
    if split not in SPLITS:
        raise DataError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    source = "test" if split == "test" else "train"
    if data_cfg.task == "synthetic":
        # Disjoint seeds keep the test problems out of the training stream.
        n = data_cfg.synthetic_size if source == "train" else max(64, data_cfg.synthetic_size // 8)
        rows = synthetic_arithmetic(n, seed=data_cfg.seed * 2 + (source == "test"), max_ops=data_cfg.synthetic_max_ops)
    else:
        rows = load_gsm8k(source, data_cfg.path)
    if split == "test":
        return rows
    train, val = split_validation(rows, data_cfg.val_size)
    return val if split == "val" else train


def attach_prompts(rows: list[dict], tokenizer, data_cfg) -> list[dict]:
    """Add ``prompt`` (text) and ``prompt_ids`` to each row; over-long prompts are dropped."""
    out = []
    for row in rows:
        text = render_prompt(tokenizer, row["question"], data_cfg.instruction, data_cfg.chat_template)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= data_cfg.max_prompt_tokens:
            out.append({**row, "prompt": text, "prompt_ids": ids})
    if not out:
        raise DataError(f"every prompt is longer than data.max_prompt_tokens={data_cfg.max_prompt_tokens}; raise it")
    return out


@dataclass
class PromptSampler:
    """Seeded, epoch-wise shuffled indices into a dataset, resumable from (epoch, position)."""

    size: int
    seed: int = 0
    epoch: int = 0
    position: int = 0

    def _order(self, epoch: int) -> list[int]:
        order = list(range(self.size))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_indices(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            order = self._order(self.epoch)
            take = min(k - len(out), self.size - self.position)
            out += order[self.position:self.position + take]
            self.position += take
            if self.position == self.size:
                self.epoch, self.position = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "size": self.size, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["size"] != self.size or state["seed"] != self.seed:
            raise DataError(f"resumed data position was saved for a dataset of {state['size']} rows "
                            f"(seed {state['seed']}), this run has {self.size} (seed {self.seed}); "
                            "resume with the same data config")
        self.epoch, self.position = state["epoch"], state["position"]
