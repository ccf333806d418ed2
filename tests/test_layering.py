"""lora_lab's modules build on each other in one direction, and none reaches into another's private names.

The rule, in one line: spine -> storage -> variants -> experiments -> course -> cli. A module may import only
from strictly earlier layers below (or from inside itself). In words:

- the spine (lora_lab/*.py) is the method and its training loop; it knows nothing of files or experiments;
- storage/ keeps models and adapters on disk and serves them (banks, mixed batches, PEFT's format);
- variants/ are LoRALinear subclasses, and the contract that checks them runs save/load, banks and PEFT;
- experiments/ pretrain, fine-tune and compare; course/ is what the notebooks use on top; cli is a thin skin.

A room's __init__.py is its front door: it comes after the room's modules. The package's own __init__ imports
everything and is not part of the order. The test reads the source (ast), so an import inside a function counts.
It finds the package through lora_lab.__file__, so it checks the installed sources from any working directory.
"""

import ast
from fnmatch import fnmatchcase
from pathlib import Path

import pytest

import lora_lab

PACKAGE = Path(lora_lab.__file__).resolve().parent
SPINE = [
    ("errors", "digests"), ("data",), ("tasks",), ("model",), ("sampling",), ("targets", "fused"), ("lora",),
    ("nf4",), ("devices",), ("distributed",), ("tensorboard_logs",), ("graphs",), ("train",),
]  # fmt: skip
STORAGE = [
    ("storage.files",), ("storage.checkpoint",), ("storage.adapters",), ("storage.bank",),
    ("storage.peft_format", "storage.mixed"), ("storage.outputs",), ("storage",),
]  # fmt: skip
VARIANTS = [("variants.*",), ("variants.contract",), ("variants",)]  # every built-in sits on the spine alone
EXPERIMENTS = [
    ("experiments.analysis",), ("experiments.pretrained",), ("experiments.defaults",), ("experiments.estimator",),
    ("experiments.reports",),
    ("experiments.finetune",), ("experiments.runs",), ("experiments.parallel",), ("experiments.stats",),
    ("experiments.protocol",),
    ("experiments.studies",),
    ("experiments.costs", "experiments.scaling", "experiments.memory"), ("experiments.crossover",),
    ("experiments.leaderboard",), ("experiments.paper_lab", "experiments.placement_lab"),
    ("experiments",),
]  # fmt: skip
COURSE = [
    ("course.numerics",), ("course.adapter_layers",), ("course.widgets",), ("course.exercises", "course.tour"),
    ("course.nbgrader",), ("course",),
]  # fmt: skip
LAYERS = SPINE + STORAGE + VARIANTS + EXPERIMENTS + COURSE + [("cli",)]


def rank_of(module: str) -> int | None:
    """The layer of a module ("lora", "storage.files", "variants"): exact names first, then patterns."""
    for exact in (True, False):
        for i, layer in enumerate(LAYERS):
            for pattern in layer:
                if (module == pattern) if exact else ("*" in pattern and fnmatchcase(module, pattern)):
                    return i
    return None


def module_of(path: Path) -> str:
    """lora_lab/lora.py -> "lora"; lora_lab/storage/files.py -> "storage.files"; lora_lab/storage/__init__.py
    -> "storage"."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def known_module(parts: list[str]) -> str:
    """The longest prefix of an absolute lora_lab path that names a module ("storage.files.read_json" ->
    "storage.files")."""
    for n in range(len(parts), 0, -1):
        name = ".".join(parts[:n])
        if (PACKAGE.joinpath(*parts[:n]).with_suffix(".py")).is_file() or (
            PACKAGE.joinpath(*parts[:n]) / "__init__.py"
        ).is_file():
            return name
    return ".".join(parts)


def imports(path: Path, source: str):
    """(imported lora_lab module, [imported names], line) for each lora_lab import in `source` (the file at path)."""
    package = list(path.relative_to(PACKAGE).parts[:-1])  # [] for lora_lab/x.py, ["storage"] for storage/x.py
    for node in ast.walk(ast.parse(source, str(path))):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("lora_lab")):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                module = base + (node.module.split(".") if node.module else [])
            else:
                module = node.module.split(".")[1:]
            names = [a.name for a in node.names]
            if node.module is None:  # "from . import tasks": each name is a module
                for name in names:
                    yield known_module(module + [name]), [], node.lineno
            else:
                yield known_module(module), names, node.lineno
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "lora_lab" and len(parts) > 1:
                    yield known_module(parts[1:]), [], node.lineno


SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py")


def test_the_package_sources_were_found():
    found = {module_of(p) for p in SOURCES}
    assert {"lora", "model", "train", "storage.adapters", "variants.dora", "experiments.protocol", "cli"} <= found, (
        f"the layering test found no lora_lab sources under {PACKAGE}"
    )
    assert len(SOURCES) >= 30


def test_every_module_is_placed_in_the_order():
    unplaced = sorted(m for m in {module_of(p) for p in SOURCES} if rank_of(m) is None)
    assert not unplaced, f"add {unplaced} to LAYERS in tests/test_layering.py (and its docstring)"


def violations(path: Path, source: str) -> list[str]:
    me, found = module_of(path), []
    for target, names, line in imports(path, source):
        where = f"{path.relative_to(PACKAGE)}:{line}"
        private = [n for n in names if n.startswith("_")]
        if private:
            found.append(f"{where} imports private name(s) {private} from {target}: publish them instead")
        if target == me:
            continue
        mine, theirs = rank_of(me), rank_of(target)
        if theirs is None:
            found.append(f"{where} imports unknown module {target}")
        elif theirs >= mine:
            found.append(
                f"{where}: {me} (layer {mine}) imports {target} (layer {theirs}), "
                "against the order spine -> storage -> variants -> experiments -> course -> cli"
            )
    return found


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_follow_the_order_and_skip_private_names(path):
    assert violations(path, path.read_text()) == []


def test_the_checker_catches_both_kinds_of_violation():
    lora, dora, files = PACKAGE / "lora.py", PACKAGE / "variants" / "dora.py", PACKAGE / "storage" / "files.py"
    assert violations(lora, "from .targets import select_targets\nfrom .errors import LoRAError\n") == []
    bad = violations(
        lora,
        "from .course.widgets import RankDashboard\nfrom .targets import _secret\n"
        "def f():\n    from .storage.adapters import save_adapter\n",
    )
    assert len(bad) == 3 and "lora (layer" in bad[0] and "_secret" in bad[1] and "storage.adapters" in bad[2]
    assert violations(dora, "from ..lora import LoRALinear\nfrom ..errors import LoRAError\n") == []
    assert "imports variants.pissa" in violations(dora, "from .pissa import PiSSALinear\n")[0]  # built-ins stand alone
    assert violations(dora, "from ..storage.adapters import save_adapter\n") == []  # storage comes first
    assert "imports experiments.finetune" in violations(dora, "from ..experiments.finetune import finetune\n")[0]
    assert "imports variants" in violations(files, "from .. import variants\n")[0]
    assert "imports experiments.protocol" in violations(files, "import lora_lab.experiments.protocol\n")[0]
