"""Downstream tasks made from tiny-shakespeare itself: what LoRA adapts the base model *to*.

The text is a sequence of speeches ("turns") separated by blank lines, each starting "SPEAKER:".
- The *source domain* is what the base GPT is pretrained on: the train split with the held-out play removed.
  Its validation text is the dataset's validation split.
- `romeo_juliet` (held-out domain): the play Romeo and Juliet (~44%-57% of the train split), which the
  base never saw. Kept for compatibility, not as the headline: to a character-level model it is barely new
  (the tiny base's loss on it is within 0.08 nats of its source loss; benchmarks/RESULTS_protocol.md).
- `shout` (style change): the source text in upper case, a deterministic rewrite of every character.
- `rot13` (new alphabet): the source text with every letter moved 13 places along the alphabet. The base
  knows every symbol but none of the words, so its loss is far above its source loss (a real gap), and the
  task has a metric besides loss: next-character accuracy on the held-out text (`metric`).
- `echo` (copying, the headline task): every word said twice. Predicting the second copy needs attention to
  the word just written; relabelling characters (what a trainable embedding does) does not help, so here LoRA on
  attention has to do the work (benchmarks/RESULTS_protocol.md has the gaps).
Every task reports the target-domain loss (adaptation) and the source-domain loss (forgetting).
shout, rot13 and echo also carry a test text (`test`, `source_test`: the dataset's test split, rewritten and
as it is) that no choice may look at: experiments.leaderboard selects on the validation text and reports there.
"""

from __future__ import annotations

from dataclasses import dataclass

# Romeo and Juliet's characters as tiny-shakespeare names them. Some names (MONTAGUE, PRINCE, Page,
# even JULIET) also speak in other plays, so the play is found as a contiguous stretch of speeches (see
# `play_span`), anchored on names that occur in no other play.
ROMEO_JULIET_CAST = frozenset(
    {
        "ROMEO",
        "JULIET",
        "Nurse",
        "MERCUTIO",
        "BENVOLIO",
        "TYBALT",
        "CAPULET",
        "LADY CAPULET",
        "FRIAR LAURENCE",
        "FRIAR JOHN",
        "MONTAGUE",
        "LADY MONTAGUE",
        "PARIS",
        "PRINCE",
        "SAMPSON",
        "GREGORY",
        "ABRAHAM",
        "BALTHASAR",
        "PETER",
        "Second Capulet",
        "Page",
    }
)
ROMEO_JULIET_ONLY = frozenset({"ROMEO", "MERCUTIO", "BENVOLIO", "TYBALT", "FRIAR LAURENCE", "Nurse", "LADY CAPULET"})
TARGET_VAL_FRACTION = 0.1  # the last 10% of the held-out play is the target validation text


def split_turns(text: str) -> list[str]:
    """Speeches separated by blank lines, each kept with its trailing blank line."""
    return [t + "\n\n" for t in text.split("\n\n") if t.strip()]


def speaker_of(turn: str) -> str | None:
    first = turn.lstrip("\n").split("\n", 1)[0]
    return first[:-1].strip() if first.endswith(":") else None


def _is(turn: str, names: frozenset[str]) -> bool:
    # The text spells some names in two ways ("Page"/"PAGE", "LADY  CAPULET"): compare normalised.
    speaker = speaker_of(turn)
    return speaker is not None and " ".join(speaker.split()).upper() in {n.upper() for n in names}


def play_span(turns: list[str], anchors=ROMEO_JULIET_ONLY, cast=ROMEO_JULIET_CAST) -> tuple[int, int]:
    """(first, last + 1) turn indices of the play: from the first to the last speech by an anchor
    character, widened over the cast speeches right before and after (the play opens with Sampson
    and Gregory and closes with the Prince)."""
    anchored = [i for i, t in enumerate(turns) if _is(t, anchors)]
    if not anchored:
        raise ValueError(f"No speech by {sorted(anchors)} in this text: it does not contain Romeo and Juliet.")
    start, stop = anchored[0], anchored[-1] + 1
    while start > 0 and _is(turns[start - 1], cast):
        start -= 1
    while stop < len(turns) and _is(turns[stop], cast):
        stop += 1
    return start, stop


def partition_play(text: str) -> tuple[str, str]:
    """(the speeches of Romeo and Juliet, every other speech), each in original order."""
    turns = split_turns(text)
    start, stop = play_span(turns)
    return "".join(turns[start:stop]), "".join(turns[:start] + turns[stop:])


def _check_splits(splits) -> None:
    if not isinstance(splits, dict):
        raise ValueError(f"splits must be a dict of split name -> text (see load_splits), got {type(splits).__name__}.")
    for name in ("train", "validation"):
        if not isinstance(splits.get(name), str) or not splits[name]:
            raise ValueError(
                f"splits[{name!r}] is missing or empty; tasks need the dataset's train and validation "
                f"text (load_splits gives both). Found splits: {sorted(splits)}."
            )


def source_domain(splits: dict[str, str]) -> dict[str, str]:
    """What the base model is pretrained on: train minus the held-out play; the usual validation split."""
    _check_splits(splits)
    _, kept = partition_play(splits["train"])
    if not kept.strip():
        raise ValueError("The train text holds nothing but Romeo and Juliet: no source domain is left to pretrain on.")
    return {"train": kept, "validation": splits["validation"]}


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    train: str  # target-domain text to fine-tune on
    validation: str  # target-domain text to measure adaptation
    source_validation: str  # source-domain text to measure forgetting
    metric: str | None = None  # a task metric besides loss, scored on the validation text (see METRICS)
    # Held-out texts that no choice (learning rate, rank, step) may look at: a table's reported numbers are
    # measured here, once the choices were made on `validation`. None where the texts had no test split.
    test: str | None = None  # target-domain test text
    source_test: str | None = None  # source-domain test text (forgetting, reported)

    def __post_init__(self):
        for name in ("train", "validation", "source_validation"):
            text = getattr(self, name)
            if not isinstance(text, str) or not text:
                raise ValueError(
                    f"Task {self.name!r}: its {name} text is empty (or not a str); the text it was "
                    "made from is too short for this task."
                )
        if (self.test is None) != (self.source_test is None):
            raise ValueError(f"Task {self.name!r}: give both test and source_test, or neither.")
        for name in ("test", "source_test"):
            text = getattr(self, name)
            if text is not None and (not isinstance(text, str) or not text):
                raise ValueError(f"Task {self.name!r}: its {name} text is empty (or not a str); give a text or None.")
        if self.metric is not None and self.metric not in METRICS:
            raise ValueError(f"Task {self.name!r}: unknown metric {self.metric!r}; choose one of {sorted(METRICS)}.")


def romeo_juliet(splits: dict[str, str]) -> Task:
    _check_splits(splits)
    held, _ = partition_play(splits["train"])
    cut = int(len(held) * (1 - TARGET_VAL_FRACTION))
    cut = held.rfind("\n\n", 0, cut) + 2  # split between speeches, not inside one
    if cut < 2:  # rfind gave -1: no speech ends before the cut
        raise ValueError(
            f"Romeo and Juliet is only {len(split_turns(held))} speech(es) in this text: too short to "
            "split into fine-tuning and validation speeches."
        )
    return Task(
        name="romeo_juliet",
        description="Held-out domain: the play Romeo and Juliet, removed from pretraining.",
        train=held[:cut],
        validation=held[cut:],
        source_validation=splits["validation"],
    )


def held_out_texts(splits: dict[str, str], rewrite) -> dict[str, str]:
    """{"test", "source_test"} of a task that rewrites the source text: the dataset's test split (never seen in
    pretraining or fine-tuning), rewritten and as it is; {} when the splits have no (or an empty) test split."""
    test = splits.get("test")
    if not isinstance(test, str) or not test:
        return {}
    return {"test": rewrite(test), "source_test": test}


def shout(splits: dict[str, str]) -> Task:
    source = source_domain(splits)
    return Task(
        name="shout",
        description=(
            "Style change: the same text written in upper case. Here a higher source loss is the task itself "
            "(a model that writes capitals finds lower case unlikely), not forgetting in the usual sense."
        ),
        train=source["train"].upper(),
        validation=source["validation"].upper(),
        source_validation=source["validation"],
        **held_out_texts(splits, str.upper),
    )


def rot13_text(text: str) -> str:
    """Every ASCII letter moved 13 places along the alphabet (case kept); applying it twice gives the text back."""
    return text.translate(ROT13_TABLE)


_LOWER, _UPPER = "abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
ROT13_TABLE = str.maketrans(_LOWER + _UPPER, _LOWER[13:] + _LOWER[:13] + _UPPER[13:] + _UPPER[:13])


def rot13(splits: dict[str, str]) -> Task:
    source = source_domain(splits)
    return Task(
        name="rot13",
        description=(
            "New alphabet: the source text with every letter moved 13 places (ROT13). Same symbols, same layout, "
            "but no word the base knows: tests learning a new mapping of familiar characters. Scored by loss and "
            "by next-character accuracy on held-out text. As with shout, part of the higher source loss is the "
            "task itself (a model that writes ROT13 finds plain English unlikely), not only forgetting."
        ),
        train=rot13_text(source["train"]),
        validation=rot13_text(source["validation"]),
        source_validation=source["validation"],
        metric="char_accuracy",
        **held_out_texts(splits, rot13_text),
    )


def echo_text(text: str) -> str:
    """Every word said twice, in place ("To be" -> "To To be be"); line breaks and spacing kept."""
    return "\n".join(" ".join(f"{w} {w}" if w else w for w in line.split(" ")) for line in text.split("\n"))


def echo(splits: dict[str, str]) -> Task:
    source = source_domain(splits)
    return Task(
        name="echo",
        description=(
            "Copying: every word of the source text said twice. The second copy is fully determined by the "
            "context, but only a model that looks back at the word it just wrote can predict it, so the task is "
            "learned by attention; the embeddings cannot relabel their way to it, as they can for rot13."
        ),
        train=echo_text(source["train"]),
        validation=echo_text(source["validation"]),
        source_validation=source["validation"],
        metric="char_accuracy",
        **held_out_texts(splits, echo_text),
    )


# Task metrics besides loss, each a fraction of held-out examples scored right (higher is better).
METRICS = {
    "char_accuracy": "next-character accuracy: the share of validation characters that are the model's most "
    "likely next character (each predicted once, from up to block_size characters of context)",
}

TASKS = {"romeo_juliet": romeo_juliet, "shout": shout, "rot13": rot13, "echo": echo}


def make_task(name: str, splits: dict[str, str]) -> Task:
    if not isinstance(name, str) or name not in TASKS:
        raise ValueError(f"Unknown task {name!r}; choose one of {sorted(TASKS)}.")
    return TASKS[name](splits)
