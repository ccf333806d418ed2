"""The fine-tuning tasks: deterministic, leak-free splits of tiny-shakespeare.

They run on the real dataset ($LORA_LAB_DATA); without it, on a small synthetic corpus in the same
"SPEAKER:\\nlines\\n\\n" shape, so the tests never need the network.
"""

import os
import random
import string
from collections import Counter

import pytest

from lora_lab import load_splits
from lora_lab.tasks import (
    METRICS,
    ROMEO_JULIET_ONLY,
    TASKS,
    Task,
    make_task,
    play_span,
    rot13_text,
    source_domain,
    speaker_of,
    split_turns,
)


def write_synthetic_corpus(path, n_turns: int = 3000, seed: int = 0):
    """A Shakespeare-shaped text: other plays, then a stretch of Romeo and Juliet (opened by Sampson,
    closed by the Prince), then other plays again, which also have a JULIET and a PRINCE of their own."""
    rng = random.Random(seed)
    others = ["First Citizen", "KING RICHARD III", "GLOUCESTER", "MENENIUS", "JULIET", "PRINCE"]
    cast = ["ROMEO", "JULIET", "Nurse", "MERCUTIO", "CAPULET"]
    words = "the and of love night fair sword king crown death lord my thy thee heaven quick zeal joy vex".split()

    def speech(speaker):
        lines = [
            " ".join(rng.choice(words) for _ in range(rng.randint(3, 9))).capitalize() + rng.choice(".,!?;")
            for _ in range(rng.randint(1, 3))
        ]
        return speaker + ":\n" + "\n".join(lines)

    turns = ["ALPHABET:\n" + string.ascii_letters + " .,;:!?'-"]
    turns += [speech(rng.choice(others[:4])) for _ in range(n_turns // 3)]
    turns += [speech("SAMPSON")] + [speech(rng.choice(cast)) for _ in range(n_turns // 3)] + [speech("PRINCE")]
    turns += [speech(rng.choice(others)) for _ in range(n_turns // 3)]
    path.write_text("\n\n".join(turns) + "\n")
    return path


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    source = os.environ.get("LORA_LAB_DATA") or write_synthetic_corpus(tmp_path_factory.mktemp("data") / "input.txt")
    return load_splits(source)


def test_tasks_are_deterministic(splits):
    for name in TASKS:
        assert make_task(name, splits) == make_task(name, dict(splits))


def test_romeo_juliet_speeches_are_absent_from_the_source_domain(splits):
    source = source_domain(splits)
    speakers = [speaker_of(t) for t in split_turns(source["train"])]
    assert speakers and not set(speakers) & ROMEO_JULIET_ONLY
    task = make_task("romeo_juliet", splits)
    # Every speech of the train split is in exactly one of the two: nothing lost, nothing left behind.
    assert Counter(split_turns(task.train + task.validation)) + Counter(split_turns(source["train"])) == Counter(
        split_turns(splits["train"])
    )
    held = [speaker_of(t) for t in split_turns(task.train + task.validation)]
    assert {"ROMEO", "JULIET"} <= set(held) and (held[0], held[-1]) == ("SAMPSON", "PRINCE")
    # Other plays' JULIET and PRINCE stay in the source domain.
    assert {"JULIET", "PRINCE"} <= set(speakers)
    assert source["validation"] == splits["validation"] == task.source_validation


def test_romeo_juliet_validation_does_not_overlap_its_train(splits):
    task = make_task("romeo_juliet", splits)
    turns = split_turns(splits["train"])
    start, stop = play_span(turns)
    held = "".join(turns[start:stop])  # one contiguous stretch of speeches
    assert task.train + task.validation == held  # a clean cut between speeches
    assert task.train.endswith("\n\n") and speaker_of(split_turns(task.validation)[0]) is not None
    assert 0.05 < len(task.validation) / len(held) < 0.15
    # No long validation speech appears verbatim in the train text (short ones like "Ay." may repeat).
    train_turns = set(split_turns(task.train))
    long_val = [t for t in split_turns(task.validation) if len(t) > 120]
    assert long_val and not [t for t in long_val if t in train_turns]


def test_shout_is_exactly_the_source_domain_in_upper_case(splits):
    task = make_task("shout", splits)
    source = source_domain(splits)
    assert task.train == source["train"].upper()
    assert task.validation == source["validation"].upper()
    assert task.source_validation == source["validation"]
    assert task.train != source["train"]  # the rewrite really changes the text


def test_every_task_character_is_in_the_dataset_vocabulary(splits):
    vocab = set("".join(splits.values()))
    for name in TASKS:
        task = make_task(name, splits)
        assert set(task.train + task.validation + task.source_validation) <= vocab


def test_unknown_task_is_a_clear_error(splits):
    with pytest.raises(ValueError, match="Unknown task 'hamlet'.*romeo_juliet.*rot13.*shout"):
        make_task("hamlet", splits)


@pytest.mark.parametrize("name", ["romeo_juliet", "shout", "rot13"])
def test_missing_or_empty_splits_are_named(name):
    with pytest.raises(ValueError, match=r"splits\['validation'\] is missing or empty"):
        make_task(name, {"train": "ROMEO:\nhi\n\n"})
    with pytest.raises(ValueError, match=r"splits\['train'\] is missing or empty"):
        make_task(name, {"train": "", "validation": "abc"})
    with pytest.raises(ValueError, match="splits must be a dict"):
        make_task(name, "ROMEO:\nhi\n\n")


def test_a_play_of_one_speech_is_too_short_to_split():
    splits = {"train": "GLOUCESTER:\nNow is the winter.\n\nROMEO:\nBut soft!\n\n", "validation": "KING:\nyes\n\n"}
    with pytest.raises(ValueError, match="only 1 speech"):
        make_task("romeo_juliet", splits)


def test_a_task_with_an_empty_text_is_refused():
    from lora_lab.tasks import Task

    with pytest.raises(ValueError, match="Task 'x': its validation text is empty"):
        Task("x", "d", train="abc", validation="", source_validation="abc")
    with pytest.raises(ValueError, match="Unknown task"):
        make_task(["shout"], {"train": "a", "validation": "b"})


def test_rot13_is_the_source_domain_in_a_shifted_alphabet(splits):
    task = make_task("rot13", splits)
    source = source_domain(splits)
    assert rot13_text("Hello, World! Zz") == "Uryyb, Jbeyq! Mm"
    assert rot13_text(task.train) == source["train"] and rot13_text(task.validation) == source["validation"]
    assert task.source_validation == source["validation"]
    # the layout survives (speeches, line breaks, punctuation), the words do not
    assert [len(t) for t in split_turns(task.validation)] == [len(t) for t in split_turns(source["validation"])]
    assert task.metric == "char_accuracy" and task.metric in METRICS


def test_every_task_says_what_it_tests_and_names_a_known_metric(splits):
    for name in TASKS:
        task = make_task(name, splits)
        assert task.name == name and len(task.description) > 40
        assert task.metric is None or task.metric in METRICS
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        Task("x", "d", train="abc", validation="abc", source_validation="abc", metric="bleu")


def test_echo_says_every_word_twice_and_keeps_the_layout(splits):
    from lora_lab.tasks import echo_text

    assert echo_text("To be, or not\n\nHAMLET:\n") == "To To be, be, or or not not\n\nHAMLET: HAMLET:\n"
    assert echo_text("a  b") == "a a  b b"  # a double space stays a double space
    task = make_task("echo", splits)
    source = source_domain(splits)
    assert task.train == echo_text(source["train"]) and task.validation == echo_text(source["validation"])
    assert task.source_validation == source["validation"] and task.metric == "char_accuracy"
    # every second word of a line repeats the word before it
    line = next(line for line in task.validation.split("\n") if line.count(" ") >= 3)
    words = line.split(" ")
    assert words[0::2] == words[1::2]
    if "test" in splits and splits["test"]:
        assert task.test == echo_text(splits["test"]) and task.source_test == splits["test"]
