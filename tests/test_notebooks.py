"""Static checks of the notebook course (no execution: `pytest --nbval notebooks` runs them).

Strict nbval compares every code cell's text output with the committed one, so the committed notebooks must
be executed, error-free, and free of output that changes from run to run outside NBVAL_IGNORE_OUTPUT cells.
"""

import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
CHAPTERS = [
    "01_low_rank",
    "02_parameter_counts",
    "03_gpt_from_scratch",
    "04_lora_from_scratch",
    "05_training_on_gpu",
    "06_merging_and_hot_swapping",
    "07_rank_explorer",
    "08_lora_variants",
    "09_scaling_out",
    "10_what_the_update_looks_like",
    "11_where_and_how_much",
    "12_memory_and_qlora",
]
# Not a numbered chapter: the worked solutions of every chapter's checked exercises.
SOLUTIONS = NOTEBOOKS / "solutions.ipynb"
# Each chapter has at least one checked exercise that trains or measures something; these are they. The chapters
# listed here also keep their exercises as stubs, with the worked solutions in solutions.ipynb.
MEASURING_EXERCISES = {
    "01_low_rank": "check_smallest_rank_below",
    "02_parameter_counts": "check_trainable_share",
    "03_gpt_from_scratch": "check_whole_text_loss",
    "04_lora_from_scratch": "check_fit_lora",
    "05_training_on_gpu": "check_gradient_bytes",
    "06_merging_and_hot_swapping": "check_merge_difference",
    "07_rank_explorer": "check_update_norm",
    "08_lora_variants": "check_frozen_adapter_bytes",
    "09_scaling_out": "check_mixed_lora_linear",  # one layer serving rows on different adapters, vs each alone
    "10_what_the_update_looks_like": "check_top_similarity",  # phi(1, 1) of two A's, measured from their SVDs
    "11_where_and_how_much": "check_source_at_target",  # forgetting at a matched loss, read off real curves
    "12_memory_and_qlora": "check_step_total_bytes",  # a training step's bytes, counted from the real tensors
}
CHECKER_CALL = re.compile(r"exercises\.(check_\w+)\(")
IGNORE = "# NBVAL_IGNORE_OUTPUT"
# Text that differs between runs and so may not appear in a compared output.
VOLATILE = [
    (re.compile(r" at 0x[0-9a-f]+"), "an object address"),
    (re.compile(r"/tmp/|/private/var/|\\AppData\\"), "a temporary path"),
    (re.compile(r"\d+(\.\d+)?\s*(it/s|s/it)"), "a progress-bar rate"),
]


def numbered_notebooks() -> list[Path]:
    return sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def source(cell) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def code_cells(nb) -> list[dict]:
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def is_ignored(cell) -> bool:
    return source(cell).lstrip().startswith(IGNORE)


def output_text(output) -> str:
    if output["output_type"] == "stream":
        text = output["text"]
    else:
        text = output.get("data", {}).get("text/plain", "")
    return "".join(text) if isinstance(text, list) else text


def test_every_chapter_is_present():
    names = [p.stem for p in numbered_notebooks()]
    missing = [c for c in CHAPTERS if c not in names]
    assert set(MEASURING_EXERCISES) == set(CHAPTERS)
    assert not missing, f"missing chapter notebooks: {missing}"
    numbers = [int(n[:2]) for n in names]
    assert len(set(numbers)) == len(numbers), f"two notebooks share a chapter number: {names}"


@pytest.fixture(params=numbered_notebooks(), ids=lambda p: p.stem)
def notebook(request):
    return request.param, load(request.param)


@pytest.fixture(params=[p for p in numbered_notebooks() if p.stem in MEASURING_EXERCISES], ids=lambda p: p.stem)
def stub_chapter(request):
    return request.param, load(request.param)


@pytest.fixture(params=numbered_notebooks() + [SOLUTIONS], ids=lambda p: p.stem)
def any_notebook(request):
    """The chapters and the solutions notebook: everything nbval runs."""
    return request.param, load(request.param)


def test_executed_in_order_without_errors(any_notebook):
    notebook = any_notebook
    path, nb = notebook
    counts = []
    for i, cell in enumerate(code_cells(nb)):
        assert cell.get("execution_count") is not None, f"{path.name}: code cell {i} was never executed"
        errors = [o for o in cell["outputs"] if o["output_type"] == "error"]
        assert not errors, f"{path.name}: code cell {i} has an error output: {errors[0].get('ename')}"
        counts.append(cell["execution_count"])
    assert counts == list(range(1, len(counts) + 1)), f"{path.name}: not executed top to bottom in one kernel"


def test_starts_with_what_you_will_learn(notebook):
    path, nb = notebook
    first = nb["cells"][0]
    assert first["cell_type"] == "markdown" and "What you will learn" in source(first), (
        f"{path.name} must open with a markdown cell containing 'What you will learn'"
    )


def test_ends_with_self_checked_exercises(notebook):
    path, nb = notebook
    cells = nb["cells"]
    starts = [i for i, c in enumerate(cells) if c["cell_type"] == "markdown" and "## Exercises" in source(c)]
    assert starts, f"{path.name} has no '## Exercises' section"
    tail = cells[starts[-1] :]
    later_sections = [
        line
        for c in tail[1:]
        if c["cell_type"] == "markdown"
        for line in source(c).splitlines()
        if re.match(r"#{1,2} ", line)
    ]
    assert not later_sections, f"{path.name}: sections after the exercises: {later_sections}"
    checks = [c for c in tail if c["cell_type"] == "code" and "exercises.check_" in source(c)]
    assert checks, f"{path.name}: the exercises never call a lora_lab.course.exercises checker"
    assert all("assert" in source(c) for c in checks), f"{path.name}: a checked exercise does not assert its report"


def exercise_check_cells(nb) -> list[dict]:
    cells = nb["cells"]
    start = max(i for i, c in enumerate(cells) if c["cell_type"] == "markdown" and "## Exercises" in source(c))
    return [c for c in cells[start:] if c["cell_type"] == "code" and "exercises.check_" in source(c)]


def test_exercises_are_stubs_not_worked_solutions(stub_chapter):
    path, nb = stub_chapter
    for cell in exercise_check_cells(nb):
        text = source(cell)
        defined = re.findall(r"^(?:def|class) (\w+)", text, re.M)
        stubs = len(re.findall(r"raise NotImplementedError", text))
        assert defined and stubs >= len(defined), (
            f"{path.name}: an exercise cell defines {defined} but does not leave them as NotImplementedError stubs "
            f"(worked solutions belong in solutions.ipynb):\n{text[:300]}"
        )
        printed = "".join(output_text(o) for o in cell["outputs"])
        assert "not answered yet" in printed, f"{path.name}: the committed stub's report is not 'not answered yet'"


def test_every_chapter_has_a_checked_exercise_that_trains_or_measures(stub_chapter):
    path, nb = stub_chapter
    checker = MEASURING_EXERCISES[path.stem]
    called = {name for c in exercise_check_cells(nb) for name in CHECKER_CALL.findall(source(c))}
    assert checker in called, f"{path.name}: its exercises never call {checker} (an exercise that trains or measures)"


def test_solutions_notebook_solves_every_checked_exercise():
    assert SOLUTIONS.is_file(), "notebooks/solutions.ipynb is missing"
    solutions = load(SOLUTIONS)
    assert re.search(r"^\s*(import lora_lab|from lora_lab)", "\n".join(source(c) for c in code_cells(solutions)), re.M)
    solved = {}
    for cell in code_cells(solutions):
        for name in CHECKER_CALL.findall(source(cell)):
            solved[name] = cell
    in_chapters = {
        name
        for path in numbered_notebooks()
        if path.stem in MEASURING_EXERCISES
        for c in exercise_check_cells(load(path))
        for name in CHECKER_CALL.findall(source(c))
    }
    missing = sorted(in_chapters - set(solved))
    assert not missing, f"solutions.ipynb has no worked solution for {missing}"
    for name in in_chapters:
        cell = solved[name]
        assert re.search(r"^assert report\.ok$", source(cell), re.M), (
            f"solutions.ipynb: {name}'s cell does not assert report.ok"
        )
        printed = "".join(output_text(o) for o in cell["outputs"])
        assert re.search(r"all \d+ checks passed", printed), f"solutions.ipynb: {name}'s committed report did not pass"


def test_has_one_scale_setting_at_the_top(notebook):
    path, nb = notebook
    first_code = source(code_cells(nb)[0])
    assert re.search(r'^SCALE = "cpu"', first_code, re.M), f'{path.name}: the first code cell must set SCALE = "cpu"'
    later = [i for i, c in enumerate(code_cells(nb)[1:], 1) if re.search(r"^SCALE\s*=", source(c), re.M)]
    assert not later, f"{path.name}: SCALE is set again in code cells {later}"


def test_ignored_cells_assert_and_are_a_minority(notebook):
    path, nb = notebook
    cells = code_cells(nb)
    ignored = [c for c in cells if is_ignored(c)]
    for c in ignored:
        assert re.search(r"\bassert\b", source(c)), f"{path.name}: ignored cell without an assert:\n{source(c)[:200]}"
    assert 2 * len(ignored) <= len(cells), f"{path.name}: {len(ignored)} of {len(cells)} code cells are ignored"


def test_compared_outputs_are_stable(any_notebook):
    path, nb = any_notebook
    for i, cell in enumerate(code_cells(nb)):
        if is_ignored(cell):
            continue
        for output in cell["outputs"]:
            if output["output_type"] == "stream":
                assert output["name"] != "stderr", (
                    f"{path.name}: compared code cell {i} writes to stderr: {output_text(output)[:200]!r}"
                )
            text = output_text(output)
            for pattern, what in VOLATILE:
                match = pattern.search(text)
                assert not match, f"{path.name}: compared code cell {i} prints {what}: {match.group(0)!r}"


def test_uses_the_library(notebook):
    path, nb = notebook
    code = "\n".join(source(c) for c in code_cells(nb))
    assert re.search(r"^\s*(import lora_lab|from lora_lab)", code, re.M), f"{path.name} never imports lora_lab"
