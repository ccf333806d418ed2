"""Downstream tasks made from tiny-shakespeare itself: what LoRA adapts the base model *to*.

The text is a sequence of speeches ("turns") separated by blank lines, each starting "SPEAKER:".
- The *source domain* is what the base GPT is pretrained on: the train split with every speech of
  the held-out play removed. Its validation text is the dataset's validation split.
- `romeo_juliet` (held-out domain): the speeches of Romeo and Juliet's cast, which the base never saw.
- `shout` (style change): the source text in upper case, a deterministic rewrite of every character.
Every task reports the target-domain loss (adaptation) and the source-domain loss (forgetting).
"""
from __future__ import annotations

from dataclasses import dataclass

# The cast of Romeo and Juliet as the speakers are named in tiny-shakespeare. All their speeches lie
# in the train split (characters ~40%-51%), so removing them leaves validation untouched.
ROMEO_JULIET_CAST = frozenset(
    {
        "ROMEO", "JULIET", "Nurse", "MERCUTIO", "BENVOLIO", "TYBALT", "CAPULET", "LADY CAPULET",
        "FRIAR LAURENCE", "FRIAR JOHN", "MONTAGUE", "LADY MONTAGUE", "PARIS", "PRINCE", "SAMPSON",
        "GREGORY", "ABRAHAM", "BALTHASAR", "PETER", "Second Capulet", "Page",
    }
)
TARGET_VAL_FRACTION = 0.1  # the last 10% of the held-out speeches are the target validation text


def split_turns(text: str) -> list[str]:
    """Speeches separated by blank lines, each kept with its trailing blank line."""
    return [t + "\n\n" for t in text.split("\n\n") if t.strip()]


def speaker_of(turn: str) -> str | None:
    first = turn.split("\n", 1)[0]
    return first[:-1].strip() if first.endswith(":") else None


def partition_by_speaker(text: str, speakers: frozenset[str]) -> tuple[str, str]:
    """(text of speeches by `speakers`, text of all other speeches), each in original order."""
    held, kept = [], []
    for turn in split_turns(text):
        (held if speaker_of(turn) in speakers else kept).append(turn)
    return "".join(held), "".join(kept)


def source_domain(splits: dict[str, str]) -> dict[str, str]:
    """What the base model is pretrained on: train minus the held-out play; the usual validation split."""
    _, kept = partition_by_speaker(splits["train"], ROMEO_JULIET_CAST)
    return {"train": kept, "validation": splits["validation"]}


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    train: str  # target-domain text to fine-tune on
    validation: str  # target-domain text to measure adaptation
    source_validation: str  # source-domain text to measure forgetting


def romeo_juliet(splits: dict[str, str]) -> Task:
    held, _ = partition_by_speaker(splits["train"], ROMEO_JULIET_CAST)
    cut = int(len(held) * (1 - TARGET_VAL_FRACTION))
    cut = held.rindex("\n\n", 0, cut) + 2  # split between speeches, not inside one
    return Task(
        name="romeo_juliet",
        description="Held-out domain: the speeches of Romeo and Juliet's cast, removed from pretraining.",
        train=held[:cut],
        validation=held[cut:],
        source_validation=splits["validation"],
    )


def shout(splits: dict[str, str]) -> Task:
    source = source_domain(splits)
    return Task(
        name="shout",
        description="Style change: the same text written in upper case.",
        train=source["train"].upper(),
        validation=source["validation"].upper(),
        source_validation=source["validation"],
    )


TASKS = {"romeo_juliet": romeo_juliet, "shout": shout}


def make_task(name: str, splits: dict[str, str]) -> Task:
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}; choose one of {sorted(TASKS)}.")
    return TASKS[name](splits)
