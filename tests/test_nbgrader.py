"""nbgrader assignments generated from the chapters (lora_lab.course.nbgrader), checked with the real nbgrader.

The course is built from the committed chapters and solutions.ipynb, released with `nbgrader generate_assignment`
(every chapter), and chapter 1 (the fastest to execute) is autograded for three students: one who submits the
worked solutions, one who submits the untouched student version, and one with the classic bug of exercise 2
(keeping the *smallest* singular values). Feedback is generated and must carry the checker's hint.
"""

import ast
import copy
import html
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from lora_lab.cli import main
from lora_lab.course import exercises
from lora_lab.course.nbgrader import (
    CODE_STUB,
    CheckFailed,
    CourseBuildError,
    build_nbgrader_course,
    chapter_overviews,
    graded_check,
    select_chapters,
    teaching_table,
)
from lora_lab.storage.files import OutputExistsError

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
AUTOGRADED = "01_low_rank"  # 6 s from a cold cache (benchmarks/RESULTS_notebooks.md); the others are slower
BUGGY_FACTORIZE = (  # the mistake the chapter warns about: the last r singular values instead of the first r
    "def factorize(W, r):\n"
    "    U, S, Vh = torch.linalg.svd(W, full_matrices=False)\n"
    "    return U[:, -r:] * S[-r:], Vh[-r:]\n"
    "\n"
    "\n"
    "report_2 = exercises.check_factorize(factorize)\n"
    "print(report_2)\n"
    "assert report_2.ok or report_2.unanswered\n"
)
HINT = "keep the r LARGEST singular values"  # what check_factorize says about that mistake


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def source(cell) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def meta(cell) -> dict:
    return cell["metadata"].get("nbgrader", {})


def nbgrader(course: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")  # one thread per kernel: the machine is shared
    done = subprocess.run(
        [sys.executable, "-m", "nbgrader", *args],
        cwd=course,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, f"nbgrader {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def course(tmp_path_factory) -> Path:
    """The whole course, built and released: source/ and release/ for every chapter with exercises."""
    pytest.importorskip("nbgrader", reason="nbgrader is in the test extra (and CI's): pip install -e '.[test]'")
    out = build_nbgrader_course(tmp_path_factory.mktemp("nbgrader") / "course")
    nbgrader(out, "generate_assignment", "*")
    return out


def stems() -> list[str]:
    return [p.stem for p in select_chapters()]


# ----------------------------------------------------------------------------------------------------
# The course folder and the released student version


def test_course_folder_has_an_assignment_per_chapter_and_a_config(course):
    assert sorted(p.name for p in (course / "source").iterdir()) == stems()
    config = (course / "nbgrader_config.py").read_text()
    assert "c.ClearSolutions.code_stub" in config and CODE_STUB in config and "c.Execute.timeout" in config
    assert (course / "gradebook.db").is_file()  # generate_assignment recorded every assignment
    for stem in stems():
        assert (course / "release" / stem / f"{stem}.ipynb").is_file()


@pytest.mark.parametrize("stem", stems())
def test_release_keeps_the_stubs_and_no_solution_code(course, stem):
    chapter = load(NOTEBOOKS / f"{stem}.ipynb")
    instructor = load(course / "source" / stem / f"{stem}.ipynb")
    student = load(course / "release" / stem / f"{stem}.ipynb")
    text = json.dumps(student)
    assert "BEGIN SOLUTION" not in text and "END SOLUTION" not in text
    solutions = [c for c in instructor["cells"] if meta(c).get("solution")]
    assert solutions, f"{stem}: no exercise became a solution cell"
    released = {meta(c)["grade_id"]: c for c in student["cells"] if meta(c).get("solution")}
    stubs = [c for c in chapter["cells"] if c["cell_type"] == "code" and "raise NotImplementedError" in source(c)]
    assert len(released) == len(solutions) == len(stubs)
    for cell, stub in zip(solutions, stubs):
        worked = source(cell).split("### BEGIN SOLUTION")[1:]
        lines = {
            line.strip()
            for region in worked
            for line in region.split("### END SOLUTION")[0].split("\n")
            if line.strip() and not line.strip().startswith(("#", "import ", "from "))
        }
        assert lines, f"{stem}: {meta(cell)['grade_id']} has an empty solution region"
        given = source(released[meta(cell)["grade_id"]])
        left = [line for line in lines if line in given and line not in source(stub)]
        assert not left, f"{stem}: solution code left in the student version: {left}"
        # The student gets the chapter's own stub back (comments aside, the same code).
        assert ast.dump(ast.parse(given)) == ast.dump(ast.parse(source(stub))), f"{stem}:\n{given}"


@pytest.mark.parametrize("stem", stems())
def test_every_exercise_has_a_locked_graded_test_and_the_rest_is_locked(course, stem):
    student = load(course / "release" / stem / f"{stem}.ipynb")
    cells = student["cells"]
    for i, cell in enumerate(cells):
        m = meta(cell)
        assert m.get("schema_version") == 3 and m.get("grade_id"), f"{stem}, cell {i}: no nbgrader metadata"
        if m["solution"]:
            test = cells[i + 1]
            assert meta(test)["grade"] and meta(test)["locked"] and meta(test)["points"] > 0
            checker = re.search(r"exercises\.(check_\w+)\(", source(cell)).group(1)
            assert f"graded_check({checker}, " in source(test), f"{stem}: the test does not run {checker}"
        elif not m["grade"]:
            assert m["locked"], f"{stem}, cell {i} is not locked"
    assert sum(meta(c)["grade"] for c in cells) == sum(meta(c)["solution"] for c in cells)


def test_a_name_the_chapter_defined_before_is_forgotten_before_the_exercise(course):
    # Chapter 4 writes MyLoRALinear in section 1 and asks for it again in exercise 1: a student cell that fails
    # must not leave section 1's class to be graded.
    cells = load(course / "release" / "04_lora_from_scratch" / "04_lora_from_scratch.ipynb")["cells"]
    i = next(n for n, c in enumerate(cells) if meta(c)["grade_id"] == "exercise_1_MyLoRALinear")
    forget = cells[i - 1]
    assert meta(forget)["locked"] and not meta(forget)["grade"]
    namespace = {"MyLoRALinear": object}
    exec(source(forget), namespace)
    assert "MyLoRALinear" not in namespace
    forgets = [c for c in cells if meta(c)["grade_id"].endswith("_forget")]
    assert forgets == [forget]  # the other exercises' names are new


# ----------------------------------------------------------------------------------------------------
# Autograding chapter 1: full marks, zero, partial marks with the hint in the feedback


def submit(course: Path, student: str, nb: dict) -> None:
    folder = course / "submitted" / student / AUTOGRADED
    folder.mkdir(parents=True)
    (folder / f"{AUTOGRADED}.ipynb").write_text(json.dumps(nb, indent=1))


@pytest.fixture(scope="module")
def graded(course) -> Path:
    instructor = load(course / "source" / AUTOGRADED / f"{AUTOGRADED}.ipynb")
    student = load(course / "release" / AUTOGRADED / f"{AUTOGRADED}.ipynb")
    worked = {meta(c)["grade_id"]: c["source"] for c in instructor["cells"] if meta(c).get("solution")}
    solved = copy.deepcopy(student)
    for cell in solved["cells"]:
        cell["source"] = worked.get(meta(cell)["grade_id"], cell["source"])
    buggy = copy.deepcopy(solved)
    (cell,) = [c for c in buggy["cells"] if meta(c)["grade_id"] == "exercise_2_factorize"]
    cell["source"] = BUGGY_FACTORIZE
    submit(course, "solved", solved)
    submit(course, "untouched", student)
    submit(course, "buggy", buggy)
    nbgrader(course, "autograde", AUTOGRADED)
    nbgrader(course, "generate_feedback", AUTOGRADED)
    return course


def scores(course: Path) -> dict[str, dict[str, float]]:
    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gb:
        return {
            s: {g.name: g.score for g in gb.find_submission(AUTOGRADED, s).notebooks[0].grades}
            for s in ("solved", "untouched", "buggy")
        }


def test_autograde_full_marks_zero_and_partial(graded):
    got = scores(graded)
    assert len(got["solved"]) == 3 and all(v == 1.0 for v in got["solved"].values()), got
    assert all(v == 0.0 for v in got["untouched"].values()), got
    assert got["buggy"] == {
        "exercise_1_rank_for_energy_test": 1.0,
        "exercise_2_factorize_test": 0.0,
        "exercise_3_smallest_rank_below_test": 1.0,
    }


def test_the_checkers_hint_reaches_the_feedback(graded):
    autograded = load(graded / "autograded" / "buggy" / AUTOGRADED / f"{AUTOGRADED}.ipynb")
    (test,) = [c for c in autograded["cells"] if meta(c).get("grade_id") == "exercise_2_factorize_test"]
    errors = [o for o in test["outputs"] if o["output_type"] == "error"]
    assert errors and errors[0]["ename"] == "CheckFailed" and HINT in errors[0]["evalue"]
    feedback = (graded / "feedback" / "buggy" / AUTOGRADED / f"{AUTOGRADED}.html").read_text()
    text = html.unescape(re.sub(r"<[^>]+>", "", feedback))
    after_test = text.split("Autograder test: exercise 2")[1]
    assert "CheckFailed" in after_test.split("Autograder test: exercise 3")[0]
    assert HINT in after_test.split("Autograder test: exercise 3")[0]
    untouched = (graded / "feedback" / "untouched" / AUTOGRADED / f"{AUTOGRADED}.html").read_text()
    assert "not answered yet" in html.unescape(untouched)


# ----------------------------------------------------------------------------------------------------
# graded_check, without nbgrader: what a test cell runs


class RandomBLoRA(nn.Module):  # chapter 4's classic bug: B initialised randomly, so training starts off the base
    def __init__(self, base, r, alpha):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.A = nn.Parameter(torch.randn(r, base.in_features) / math.sqrt(base.in_features))
        self.B = nn.Parameter(torch.randn(base.out_features, r))  # the bug: LoRA starts B at zero
        self.scale = alpha / r

    def forward(self, x):
        return self.base(x) + self.scale * (x @ self.A.T @ self.B.T)


def test_graded_check_fails_with_the_hint_and_passes_quietly(capsys):
    with pytest.raises(CheckFailed, match="B should start at zero"):
        graded_check(exercises.check_lora_layer, RandomBLoRA)
    assert graded_check(exercises.check_uniform_loss, math.log) is None
    assert "all 3 checks passed" in capsys.readouterr().out


def test_graded_check_prints_warnings_to_stdout(capsys):
    import warnings

    def loud(vocab_size):
        warnings.warn("a warning from the student's code", stacklevel=2)
        return math.log(vocab_size)

    graded_check(exercises.check_uniform_loss, loud)
    out, err = capsys.readouterr()
    assert "a warning from the student's code" in out and not err  # stderr would cost the student the points


# ----------------------------------------------------------------------------------------------------
# Bad input, changed sources, the command line


def copy_notebooks(tmp_path: Path) -> Path:
    folder = tmp_path / "notebooks"
    shutil.copytree(NOTEBOOKS, folder, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    return folder


def test_a_changed_solution_changes_the_assignment(tmp_path):
    folder = copy_notebooks(tmp_path)
    solutions = load(folder / "solutions.ipynb")
    for cell in solutions["cells"]:
        if "def break_even_rank" in source(cell):
            cell["source"] = source(cell).replace("(d * k - 1) // (d + k)", "max(0, (d * k - 1) // (d + k))")
    (folder / "solutions.ipynb").write_text(json.dumps(solutions))
    out = build_nbgrader_course(tmp_path / "course", ["02"], notebooks=folder)
    text = source(
        next(
            c
            for c in load(out / "source" / "02_parameter_counts" / "02_parameter_counts.ipynb")["cells"]
            if meta(c).get("grade_id") == "exercise_2_break_even_rank"
        )
    )
    assert "return max(0, (d * k - 1) // (d + k))" in text


def test_an_exercise_without_a_solution_is_refused_and_nothing_is_written(tmp_path):
    folder = copy_notebooks(tmp_path)
    solutions = load(folder / "solutions.ipynb")
    solutions["cells"] = [c for c in solutions["cells"] if "check_factorize(factorize)" not in source(c)]
    (folder / "solutions.ipynb").write_text(json.dumps(solutions))
    with pytest.raises(CourseBuildError, match=r"01_low_rank.ipynb, cell \d+ \(factorize\).*check_factorize"):
        build_nbgrader_course(tmp_path / "course", notebooks=folder)
    assert not (tmp_path / "course").exists()


def test_missing_chapters_and_unknown_names_are_named(tmp_path):
    with pytest.raises(CourseBuildError, match="--notebooks"):
        build_nbgrader_course(tmp_path / "course", notebooks=tmp_path / "nowhere")
    with pytest.raises(CourseBuildError, match="unknown chapter '42'.*01_low_rank"):
        build_nbgrader_course(tmp_path / "course", ["42"])
    assert not (tmp_path / "course").exists()


def test_a_folder_of_your_files_is_refused_untouched(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError):
        build_nbgrader_course(mine, ["01"])
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_cli_builds_and_refuses_bad_out_before_work(tmp_path, capsys):
    out = tmp_path / "course"
    assert main(["course", "nbgrader", str(out), "--chapters", "01", "2"]) == 0
    assert sorted(p.name for p in (out / "source").iterdir()) == ["01_low_rank", "02_parameter_counts"]
    assert main(["course", "nbgrader", str(out), "--chapters", "01"]) == 0  # a rebuild of its own course
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert main(["course", "nbgrader", str(mine)]) == 2
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    assert main(["course", "nbgrader", str(tmp_path / "new"), "--notebooks", str(tmp_path / "nowhere")]) == 2
    assert not (tmp_path / "new").exists()
    assert "--notebooks" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# What the chapters say about themselves, and the README's table


def test_each_chapter_states_its_measured_time():
    measured = dict(
        re.findall(r"^\| (\d\d) [^|]*\| (\d+ s) \|", (ROOT / "benchmarks" / "RESULTS_notebooks.md").read_text(), re.M)
    )
    for o in chapter_overviews():
        assert o.cpu_time == measured[o.stem[:2]], f"{o.stem}: says {o.cpu_time}, RESULTS_notebooks.md measured"
        assert o.prerequisites and len(o.objectives) >= 3 and o.gpu_time


def test_readme_table_is_what_the_chapters_say():
    readme = (ROOT / "README.md").read_text()
    assert teaching_table() in readme, "regenerate the table with `lora-lab course table` and paste it in README.md"
