"""nbgrader assignments generated from the chapters: a course folder an instructor can release and autograde.

The chapters and notebooks/solutions.ipynb stay the single source. `build_nbgrader_course` reads them and writes
a complete nbgrader course folder:

    OUT/nbgrader_config.py                      course id, the stub students see, a per-cell timeout
    OUT/source/<chapter>/<chapter>.ipynb        one assignment per chapter that has checked exercises
    OUT/README.md                               the chapters' times, prerequisites and objectives; the workflow

In each assignment notebook
- every checked exercise cell (a stub `raise NotImplementedError  # your code here`, then its checker) becomes an
  nbgrader *solution* cell: the worked solution from solutions.ipynb replaces the stub line inside
  `### BEGIN SOLUTION` / `### END SOLUTION`, so `nbgrader generate_assignment` gives the student the stub back;
- after it comes a *graded*, locked test cell (EXERCISE_POINTS points) that runs lora_lab's checker again through
  `graded_check`, which fails with the checker's report, hints included, so the hint reaches nbgrader's feedback;
- every other cell is locked read-only.

A changed exercise, solution or checker changes the assignment on the next build; nothing is kept by hand. The
notebooks are found next to the package (a source checkout or an editable install); elsewhere pass `notebooks=`
(`--notebooks` on the command line). Building needs no nbgrader; releasing and grading do (`pip install
lora-lab[classroom]`).

Each chapter opens with a "Before you start" part: **Prerequisites:** and **Time:** (the chapter's measured run
time from benchmarks/RESULTS_notebooks.md), after its "What you will learn" list. `chapter_overviews` reads them
and `teaching_table` turns them into the README's table.
"""

from __future__ import annotations

import ast
import builtins
import copy
import json
import os
import re
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..storage.files import claim_output_dir, write_file_atomic

NBGRADER_OUTPUT_FORMAT = "lora_lab-nbgrader-course-v1"
COURSE_ID = "lora_lab"
EXERCISE_POINTS = 1  # per checked exercise; every check of it must pass
CODE_STUB = "raise NotImplementedError  # your code here"  # what the chapters' stubs say, and what students get
CELL_TIMEOUT_S = 1800  # per cell under autograde: chapter 3 pretrains the base on a cold cache (nbgrader's: 30 s)
SCHEMA_VERSION = 3  # nbgrader's cell-metadata schema
DELIMITERS = ("BEGIN SOLUTION", "END SOLUTION")
SOLUTIONS = "solutions.ipynb"
CHAPTER_GLOB = "[0-9][0-9]_*.ipynb"
NOT_FOUND_HINT = "pass the folder with notebooks=... (on the command line: --notebooks DIR)"


class CourseBuildError(ValueError):
    """The chapters or the solutions cannot be turned into assignments (the message names the cell and why)."""


# ----------------------------------------------------------------------------------------------------
# Grading: what a test cell runs


class CheckFailed(AssertionError):
    """A checked exercise failed under the autograder; the message is the checker's whole report."""


def graded_check(checker, answer) -> None:
    """Run `checker(answer)` (an exercises.check_* function) as an autograder test: print the report when every
    check passes, else raise CheckFailed with the report, hints included (nbgrader shows it in the feedback).

    Warnings are printed to stdout: nbgrader gives no points to a cell that wrote to stderr. Returns None on
    purpose: a test cell whose last value is a number would be read by nbgrader as partial credit."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = checker(answer)
    for w in caught:
        print(f"warning: {w.category.__name__}: {w.message}")
    if not report.ok:
        raise CheckFailed(f"\n{report}")
    print(report)


# ----------------------------------------------------------------------------------------------------
# Finding and reading the notebooks


def default_notebooks_dir() -> Path:
    """notebooks/ next to the package: there in a source checkout and an editable install, not in a wheel."""
    return Path(__file__).resolve().parents[2] / "notebooks"


def _notebooks_dir(notebooks: str | os.PathLike | None) -> Path:
    folder = Path(notebooks).expanduser() if notebooks is not None else default_notebooks_dir()
    where = "the given notebooks folder" if notebooks is not None else "the notebooks folder next to the package"
    if not folder.is_dir():
        raise CourseBuildError(f"no chapters found: {where}, {folder}, does not exist; {NOT_FOUND_HINT}")
    if not sorted(folder.glob(CHAPTER_GLOB)) or not (folder / SOLUTIONS).is_file():
        raise CourseBuildError(
            f"no chapters found in {where}, {folder}: it needs the chapter notebooks ({CHAPTER_GLOB}) and "
            f"{SOLUTIONS}; {NOT_FOUND_HINT}"
        )
    return folder


def _read_notebook(path: Path) -> dict:
    try:
        nb = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CourseBuildError(f"cannot read the notebook {path}: {err}") from None
    if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list) or nb.get("nbformat") != 4:
        raise CourseBuildError(f"{path} is not a Jupyter notebook (nbformat 4)")
    return nb


def _source(cell: dict) -> str:
    text = cell.get("source", "")
    return "".join(text) if isinstance(text, list) else text


def _as_lines(text: str) -> list[str]:
    return text.splitlines(keepends=True)  # as nbformat stores a source


def _python(text: str) -> str:
    """A code cell's source with IPython magics and shell lines blanked (kept as lines, so line numbers hold)."""
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in text.split("\n"))


def _parse(text: str, where: str) -> ast.Module:
    try:
        return ast.parse(_python(text))
    except SyntaxError as err:
        raise CourseBuildError(f"{where}: not valid Python ({err.msg}, line {err.lineno})") from None


def select_chapters(chapters=None, notebooks: str | os.PathLike | None = None) -> list[Path]:
    """The chapter notebooks to use: all (None), or those named by number ("1", "01") or name ("01_low_rank")."""
    folder = _notebooks_dir(notebooks)
    found = sorted(folder.glob(CHAPTER_GLOB))
    if chapters is None:
        return found
    if isinstance(chapters, str):
        chapters = [chapters]
    chosen = []
    for name in chapters:
        key = str(name).strip().removesuffix(".ipynb")
        match = [p for p in found if p.stem == key or (key.isdigit() and int(p.stem[:2]) == int(key))]
        if not match:
            known = ", ".join(p.stem for p in found)
            raise CourseBuildError(f"unknown chapter {name!r}; the chapters in {folder} are {known}")
        chosen += [p for p in match if p not in chosen]
    if not chosen:
        raise CourseBuildError("no chapters chosen: name at least one, or leave chapters out for all of them")
    return sorted(chosen)


# ----------------------------------------------------------------------------------------------------
# Exercises and their worked solutions


@dataclass
class Stub:
    """One `raise NotImplementedError` line of an exercise, and the worked code that replaces it."""

    line: int  # 0-based line in the exercise cell
    indent: str
    remark: str  # what the stub's comment says beyond CODE_STUB's ("return B, A"), kept for the student
    solution: list[str]  # the worked lines, already indented


@dataclass
class Exercise:
    number: int  # 1, 2, ... within its chapter
    name: str  # the function or class the learner writes
    checker: str  # the exercises.check_* it is checked with
    cell: int  # index of its cell in the chapter
    stubs: list[Stub]
    bound_before: bool = False  # an earlier cell binds the same name (chapter 4's worked MyLoRALinear)

    @property
    def grade_id(self) -> str:
        return f"exercise_{self.number}_{self.name}"


def _checker_calls(tree: ast.Module):
    """(checker name, name of the function or class passed, the call) for each `exercises.check_x(name)`."""
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "exercises"
            and node.func.attr.startswith("check_")
            and node.args
            and isinstance(node.args[0], ast.Name)
        ):
            yield node.func.attr, node.args[0].id, node


def _top_level(tree: ast.Module, name: str):
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return node
    return None


def _functions(node, path=()):
    """(path inside the exercise object, function node) for the object itself and the methods of a class."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        yield path, node
    elif isinstance(node, ast.ClassDef):
        for child in node.body:
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path + (child.name,), child


def _is_stub(stmt) -> bool:
    exc = getattr(stmt, "exc", None)
    if isinstance(exc, ast.Call):
        exc = exc.func
    return isinstance(stmt, ast.Raise) and isinstance(exc, ast.Name) and exc.id == "NotImplementedError"


def _worked_solutions(nb: dict) -> dict[str, tuple[ast.AST, list[str], str]]:
    """checker name -> (the definition the solutions notebook checks as correct, its cell's lines, cell label).

    A solution is the function or class passed to a checker whose report is then asserted `.ok`; the mistakes the
    notebook demonstrates (asserted `not ... .ok`) are not solutions."""
    found = {}
    for i, cell in enumerate(nb["cells"]):
        if cell.get("cell_type") != "code":
            continue
        text = _source(cell)
        tree = _parse(text, f"{SOLUTIONS}, cell {i}")
        asserted_ok = {
            n.test.value.id
            for n in ast.walk(tree)
            if isinstance(n, ast.Assert)
            and isinstance(n.test, ast.Attribute)
            and n.test.attr == "ok"
            and isinstance(n.test.value, ast.Name)
        }
        for stmt in tree.body:
            value = getattr(stmt, "value", None)
            targets = [t.id for t in getattr(stmt, "targets", []) if isinstance(t, ast.Name)]
            if not (isinstance(stmt, ast.Assign) and isinstance(value, ast.Call) and set(targets) & asserted_ok):
                continue
            for checker, name, _ in _checker_calls(ast.Module(body=[stmt], type_ignores=[])):
                definition = _top_level(tree, name)
                if definition is not None and checker not in found:
                    found[checker] = (definition, _python(text).split("\n"), f"{SOLUTIONS}, cell {i}")
    return found


def _imports(tree: ast.Module) -> dict[str, str]:
    """name -> the import statement that binds it, for the top-level imports of a cell."""
    bound = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Import):
            for alias in stmt.names:
                as_ = f" as {alias.asname}" if alias.asname else ""
                bound[alias.asname or alias.name.split(".")[0]] = f"import {alias.name}{as_}"
        elif isinstance(stmt, ast.ImportFrom) and stmt.level == 0:
            for alias in stmt.names:
                as_ = f" as {alias.asname}" if alias.asname else ""
                bound[alias.asname or alias.name] = f"from {stmt.module} import {alias.name}{as_}"
    return bound


def _free_names(function, statements) -> set[str]:
    """Names the statements read that neither the function's arguments nor its own assignments bind."""
    args = function.args
    local = {a.arg for a in args.posonlyargs + args.args + args.kwonlyargs}
    local |= {a.arg for a in (args.vararg, args.kwarg) if a is not None}
    read = set()
    for stmt in statements:
        for node in ast.walk(stmt):
            if isinstance(node, ast.Name):
                (read if isinstance(node.ctx, ast.Load) else local).add(node.id)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                local.add(node.name)
            elif isinstance(node, ast.arg):
                local.add(node.arg)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                local |= {a.asname or a.name.split(".")[0] for a in node.names}
    return read - local - set(dir(builtins))


def _solution_lines(
    stub_fn, solution_fn, sol_lines: list[str], indent: str, context: dict, where: str, sol_where: str
) -> list[str]:
    """The worked body of `solution_fn` that replaces the stub line of `stub_fn`, indented to `indent`."""
    before = stub_fn.body[:-1]  # what the stub already has before its raise (e.g. super().__init__())
    body = solution_fn.body
    if [ast.dump(s) for s in body[: len(before)]] != [ast.dump(s) for s in before] or len(body) <= len(before):
        raise CourseBuildError(
            f"{where}: the stub's {stub_fn.name}() starts with code that the worked solution in {sol_where} does "
            "not start with, so the solution cannot replace its `raise NotImplementedError`"
        )
    kept = body[len(before) :]
    first = min([kept[0].lineno] + [d.lineno for d in getattr(kept[0], "decorator_list", [])])
    text = textwrap.dedent("\n".join(sol_lines[first - 1 : kept[-1].end_lineno]))
    names = _free_names(solution_fn, kept)
    sol_imports, chapter_imports = context["solution_imports"], context["chapter_imports"]
    needed = []
    for name in sorted(names):
        if name in context["solution_defined"]:
            raise CourseBuildError(
                f"{sol_where}: the solution of {where} uses {name!r}, which solutions.ipynb defines itself; "
                "an assignment cannot carry it (import it from lora_lab, or define it inside the solution)"
            )
        if name in sol_imports and chapter_imports.get(name) != sol_imports[name]:
            needed.append(sol_imports[name])  # imported inside the function: the chapter need not import it
    lines = sorted(set(needed)) + text.split("\n")
    return [indent + line if line.strip() else "" for line in lines]


def _exercises(chapter: Path, nb: dict, solutions: dict, names: dict) -> list[Exercise]:
    """The checked exercises of a chapter, each stub paired with its worked solution (names: see _solutions)."""
    chapter_imports, found = {}, []
    trees = {}
    for i, cell in enumerate(nb["cells"]):
        if cell.get("cell_type") == "code":
            trees[i] = _parse(_source(cell), f"{chapter.name}, cell {i}")
            chapter_imports.update(_imports(trees[i]))
    context = {"chapter_imports": chapter_imports, **names}
    bound = set()  # names the cells before the current one bind at top level
    for i, tree in trees.items():
        lines = _python(_source(nb["cells"][i])).split("\n")
        for checker, name, _ in _checker_calls(tree):
            definition = _top_level(tree, name)
            if definition is None:
                continue  # a checker run on something defined elsewhere: a demonstration, not an exercise
            stub_fns = [(p, f) for p, f in _functions(definition) if f.body and _is_stub(f.body[-1])]
            if not stub_fns:
                continue  # a worked example the chapter checks itself (chapter 4's MyLoRALinear in section 1)
            where = f"{chapter.name}, cell {i} ({name})"
            if checker not in solutions:
                raise CourseBuildError(f"{where}: no worked solution checked with exercises.{checker} in {SOLUTIONS}")
            solution, sol_lines, sol_where = solutions[checker]
            solution_fns = dict(_functions(solution))
            stubs = []
            for path, fn in stub_fns:
                if path not in solution_fns:
                    raise CourseBuildError(f"{where}: the worked solution in {sol_where} has no {'.'.join(path)}()")
                raise_stmt = fn.body[-1]
                line = lines[raise_stmt.lineno - 1]
                indent, stripped = line[: len(line) - len(line.lstrip())], line.strip()
                if raise_stmt.lineno != raise_stmt.end_lineno or not stripped.startswith("raise NotImplementedError"):
                    raise CourseBuildError(f"{where}: a stub must be one line `{CODE_STUB}`, got {stripped!r}")
                # Words the stub adds to "# your code here" ("return B, A") are kept for the student.
                comment = stripped.partition("#")[2].strip()
                remark = comment.removeprefix("your code here").lstrip(":").strip()
                body = _solution_lines(fn, solution_fns[path], sol_lines, indent, context, where, sol_where)
                stubs.append(Stub(raise_stmt.lineno - 1, indent, remark, body))
            found.append(Exercise(len(found) + 1, name, checker, i, stubs, bound_before=name in bound))
        bound |= _bound_names(tree)
    return found


def _bound_names(tree: ast.Module) -> set[str]:
    names = set(_imports(tree))
    for stmt in tree.body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(stmt.name)
        for target in getattr(stmt, "targets", []):
            names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
    return names


def _solutions(folder: Path) -> tuple[dict, dict]:
    """The worked solutions by checker, and what solutions.ipynb binds: its imports (name -> statement), which a
    solution may need inside the chapter, and the names it defines itself, which a solution may not use."""
    nb = _read_notebook(folder / SOLUTIONS)
    solutions = _worked_solutions(nb)
    imports, defined = {}, set()
    for i, cell in enumerate(nb["cells"]):
        if cell.get("cell_type") == "code":
            tree = _parse(_source(cell), f"{SOLUTIONS}, cell {i}")
            imports.update(_imports(tree))
            defined |= _bound_names(tree) - set(_imports(tree))
    return solutions, {"solution_imports": imports, "solution_defined": defined}


# ----------------------------------------------------------------------------------------------------
# One chapter -> one nbgrader source notebook


def _nbgrader_meta(grade_id: str, *, solution=False, grade=False, locked=True, points=None) -> dict:
    meta = {
        "grade": grade,
        "grade_id": grade_id,
        "locked": locked,
        "schema_version": SCHEMA_VERSION,
        "solution": solution,
        "task": False,
    }
    if points is not None:
        meta["points"] = points
    return meta


def _clean(cell: dict) -> dict:
    """A copy without outputs and run metadata: nbgrader releases and grades notebooks without outputs."""
    cell = copy.deepcopy(cell)
    cell["metadata"] = {k: v for k, v in cell.get("metadata", {}).items() if k not in ("execution", "nbgrader")}
    if cell["cell_type"] == "code":
        cell["outputs"], cell["execution_count"] = [], None
    return cell


def _solution_cell(cell: dict, exercise: Exercise) -> dict:
    original = _source(cell).split("\n")  # magics kept as they were
    stubs = {s.line: s for s in exercise.stubs}
    out = []
    for n, line in enumerate(original):
        stub = stubs.get(n)
        if stub is None:
            out.append(line)
            continue
        if stub.remark:  # the stub's own words ("return B, A") stay in front of the student
            out.append(f"{stub.indent}# {stub.remark}")
        out += [f"{stub.indent}### BEGIN SOLUTION", *stub.solution, f"{stub.indent}### END SOLUTION"]
    new = _clean(cell)
    new["source"] = _as_lines("\n".join(out))
    new["metadata"]["nbgrader"] = _nbgrader_meta(exercise.grade_id, solution=True, locked=False)
    return new


def _forget_cell(exercise: Exercise, cell_id: str) -> dict:
    """A locked cell that unbinds the exercise's name before the student's cell defines it again: if that cell
    fails, the test must not grade what the chapter defined earlier under the same name."""
    text = (
        f"# Before exercise {exercise.number}: forget the {exercise.name} defined earlier in the chapter, so that the\n"
        "# autograder grades only the one you write below.\n"
        f"_ = globals().pop({exercise.name!r}, None)"
    )
    return {
        "cell_type": "code",
        "execution_count": None,
        "id": cell_id,
        "metadata": {"nbgrader": _nbgrader_meta(f"{exercise.grade_id}_forget")},
        "outputs": [],
        "source": _as_lines(text),
    }


def _test_cell(exercise: Exercise, cell_id: str) -> dict:
    text = (
        f"# Autograder test: exercise {exercise.number}, {exercise.name} ({EXERCISE_POINTS} point"
        f"{'s' if EXERCISE_POINTS != 1 else ''}).\n"
        "# lora_lab's checker runs your answer again; a failed check fails this cell with the checker's hints.\n"
        f"from lora_lab.course.exercises import {exercise.checker}\n"
        "from lora_lab.course.nbgrader import graded_check\n"
        "\n"
        f"graded_check({exercise.checker}, {exercise.name})"
    )
    return {
        "cell_type": "code",
        "execution_count": None,
        "id": cell_id,
        "metadata": {"nbgrader": _nbgrader_meta(f"{exercise.grade_id}_test", grade=True, points=EXERCISE_POINTS)},
        "outputs": [],
        "source": _as_lines(text),
    }


def _assignment_notebook(chapter: Path, nb: dict, exercises: list[Exercise]) -> dict:
    by_cell = {e.cell: e for e in exercises}
    cells, ids = [], set()
    for i, cell in enumerate(nb["cells"]):
        text = _source(cell)
        if any(d in text for d in DELIMITERS):
            raise CourseBuildError(
                f"{chapter.name}, cell {i}: contains nbgrader's solution delimiter ({' / '.join(DELIMITERS)}), "
                "which generate_assignment would cut out"
            )
        cell_id = cell.get("id") or f"cell-{i}"
        ids.add(cell_id)
        exercise = by_cell.get(i)
        if exercise is None:
            new = _clean(cell)
            new["metadata"]["nbgrader"] = _nbgrader_meta(f"cell-{cell_id}")
            cells.append(new)
            continue
        forget = [_forget_cell(exercise, f"{cell_id}-forget"[:64])] if exercise.bound_before else []
        test = _test_cell(exercise, f"{cell_id}-test"[:64])
        for new in forget + [test]:
            if new["id"] in ids:
                raise CourseBuildError(f"{chapter.name}: cell id {new['id']!r} is taken")
            ids.add(new["id"])
        cells += forget + [_solution_cell(cell, exercise), test]
    metadata = {k: v for k, v in nb.get("metadata", {}).items() if k != "widgets"}  # widget state of no output
    return {"cells": cells, "metadata": metadata, "nbformat": 4, "nbformat_minor": max(nb.get("nbformat_minor", 5), 5)}


def _notebook_text(nb: dict) -> str:
    return json.dumps(nb, indent=1, ensure_ascii=False) + "\n"


# ----------------------------------------------------------------------------------------------------
# What each chapter says about itself: prerequisites, objectives, time


@dataclass
class ChapterOverview:
    stem: str  # "01_low_rank"
    title: str  # "Low-rank decomposition"
    prerequisites: str
    objectives: list[str]
    cpu_time: str  # as the chapter states it, e.g. "6 s"
    gpu_time: str  # e.g. "not measured"


def _section(text: str, heading: str) -> str:
    match = re.search(rf"^##\s+{re.escape(heading)}\s*$(.*?)(?=^##\s|\Z)", text, re.M | re.S)
    return match.group(1) if match else ""


def _field(text: str, name: str, where: str) -> str:
    match = re.search(rf"^\*\*{re.escape(name)}:\*\*\s*(.+?)(?=\n\s*\n|\n\*\*|\Z)", text, re.M | re.S)
    if not match:
        raise CourseBuildError(f"{where}: its first cell has no '**{name}:**' line (see lora_lab.course.nbgrader)")
    return " ".join(match.group(1).split())


def chapter_overview(path: str | os.PathLike) -> ChapterOverview:
    """What a chapter's first (markdown) cell says: its title, prerequisites, objectives and measured time."""
    path = Path(path)
    nb = _read_notebook(path)
    first = nb["cells"][0] if nb["cells"] else {}
    text = _source(first)
    if first.get("cell_type") != "markdown":
        raise CourseBuildError(f"{path.name}: the first cell is not the chapter's markdown introduction")
    title = re.match(r"#\s+(?:Chapter\s+\d+\s+[—-]\s+)?(.+)", text.strip())
    objectives = [
        " ".join(b.split())
        for b in re.findall(r"^- (.+?)(?=^- |\n\s*\n|\Z)", _section(text, "What you will learn"), re.M | re.S)
    ]
    if not objectives:
        raise CourseBuildError(f"{path.name}: its first cell has no '## What you will learn' list")
    time = _field(text, "Time", path.name)
    cpu = re.match(r"(\d+(?:\.\d+)?\s*(?:s|min))\b", time)
    gpu = re.search(r"on a GPU:?\s*([^.;]+)", time)
    if not cpu or not gpu:
        raise CourseBuildError(
            f"{path.name}: the '**Time:**' line should start with the CPU time (e.g. '6 s') and say 'on a GPU: ...'"
        )
    return ChapterOverview(
        stem=path.stem,
        title=title.group(1).strip() if title else path.stem,
        prerequisites=_field(text, "Prerequisites", path.name),
        objectives=objectives,
        cpu_time=cpu.group(1),
        gpu_time=gpu.group(1).strip(),
    )


def chapter_overviews(chapters=None, notebooks: str | os.PathLike | None = None) -> list[ChapterOverview]:
    return [chapter_overview(p) for p in select_chapters(chapters, notebooks)]


def teaching_table(chapters=None, notebooks: str | os.PathLike | None = None) -> str:
    """The Markdown table of the README's "Teaching with lora_lab": per chapter, read from the chapter itself."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    rows = [
        "| chapter | time, 2-core CPU | time, GPU | prerequisites | objectives |",
        "| --- | ---: | --- | --- | --- |",
    ]
    for o in chapter_overviews(chapters, notebooks):
        objectives = "; ".join(x.rstrip(".") for x in o.objectives)
        rows.append(
            f"| {o.stem[:2]} {cell(o.title)} | {o.cpu_time} | {o.gpu_time} | {cell(o.prerequisites)} | "
            f"{cell(objectives)} |"
        )
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------------
# The course folder


WORKFLOW = """\
cd {out}
nbgrader generate_assignment 01_low_rank       # release/: the student version (stubs, no solutions)
nbgrader release_assignment 01_low_rank        # or hand release/01_low_rank/ out (a JupyterHub exchange, an LMS)
nbgrader collect 01_low_rank                   # or copy each student's notebook to submitted/<student>/01_low_rank/
nbgrader autograde 01_low_rank                 # runs every submission; scores in gradebook.db
nbgrader generate_feedback 01_low_rank         # feedback/: each student's notebook with the checkers' hints"""


def _config_text() -> str:
    return f'''\
"""nbgrader configuration of the lora_lab course. Written by `lora-lab course nbgrader`; a rebuild replaces it."""

c = get_config()  # noqa: F821 (nbgrader's config loader provides get_config)

c.CourseDirectory.course_id = {COURSE_ID!r}
# What a student sees in place of each worked solution: the chapters' own stub.
c.ClearSolutions.code_stub = {{"python": {CODE_STUB!r}}}
# Per cell under autograde: chapter 3 pretrains the base model when the cache is cold (nbgrader's default: 30 s).
c.Execute.timeout = {CELL_TIMEOUT_S}
# release_assignment and collect meet the students in nbgrader's exchange folder (on a JupyterHub, a shared one):
# c.Exchange.root = "/srv/nbgrader/exchange"
'''


def _readme_text(out: Path, overviews: list[ChapterOverview], table: str, points: dict[str, int]) -> str:
    listed = "\n".join(f"- `{o.stem}`: {points[o.stem]} exercise(s), {points[o.stem]} point(s)" for o in overviews)
    return f"""# lora_lab as an nbgrader course

Generated by `lora-lab course nbgrader` from the chapters and notebooks/solutions.ipynb; rebuild it after a
chapter changes (a rebuild replaces `source/` and `nbgrader_config.py`, never the gradebook or submissions).

Assignments (one per chapter; {EXERCISE_POINTS} point per checked exercise, given when every check passes):

{listed}

## The workflow

```bash
{WORKFLOW.format(out=out)}
```

Autograding runs the notebooks: set `LORA_LAB_CACHE` to the cached base models (and `LORA_LAB_DATA` to the data,
offline) so that chapter 3 onward load the base instead of pretraining it for every student.

## The chapters

{table}
"""


def check_nbgrader_output(out_dir: str | os.PathLike) -> Path:
    """Claim `out_dir` for a course folder: missing, empty, or an earlier course of this command. Anything else (a
    file, a folder of your files) raises files.OutputExistsError and is left untouched."""
    return claim_output_dir(out_dir, NBGRADER_OUTPUT_FORMAT)


def build_nbgrader_course(
    out_dir: str | os.PathLike, chapters=None, *, notebooks: str | os.PathLike | None = None
) -> Path:
    """Build an nbgrader course folder at `out_dir` from the chapters (all, or those named: "01", "02_...") and
    notebooks/solutions.ipynb; return its path. See the module docstring for what it holds.

    Everything is read and converted before anything is written: a chapter whose exercise has no worked solution,
    or a folder without chapters, raises CourseBuildError and writes nothing. `out_dir` must be missing, empty or
    an earlier course of this function (files.OutputExistsError otherwise)."""
    paths = select_chapters(chapters, notebooks)
    solutions, names = _solutions(paths[0].parent)
    assignments, overviews, points = {}, [], {}
    for path in paths:
        nb = _read_notebook(path)
        exercises = _exercises(path, nb, solutions, names)
        if not exercises:
            continue  # a chapter without checked exercises has nothing to grade
        assignments[path.stem] = _notebook_text(_assignment_notebook(path, nb, exercises))
        overviews.append(chapter_overview(path))
        points[path.stem] = len(exercises) * EXERCISE_POINTS
    if not assignments:
        raise CourseBuildError(f"none of the chosen chapters has a checked exercise: {[p.stem for p in paths]}")
    table = teaching_table([o.stem for o in overviews], paths[0].parent)
    out = check_nbgrader_output(out_dir)
    for stem, text in assignments.items():
        write_file_atomic(
            out / "source" / stem / f"{stem}.ipynb", text, overwrite=True
        )  # ours: inside the claimed course folder
    write_file_atomic(out / "nbgrader_config.py", _config_text(), overwrite=True)
    write_file_atomic(out / "README.md", _readme_text(out, overviews, table, points), overwrite=True)
    return out
