"""lora_lab's modules build on each other in one direction, and none reaches into another's private names.

The declared order, lowest first (a module may import only from strictly earlier layers):

    files, errors -> data, tasks -> model -> sampling, adapter_layers -> targets, fused -> lora -> variants
    -> checkpoint -> adapters -> peft_interop, multi_adapter -> contract -> distributed -> train -> pretrained
    -> protocol -> finetune, scaling, costs -> outputs -> widgets -> exercises, tour -> cli

That is the issue's data -> model -> lora -> train -> analysis/widgets -> cli, refined to today's modules:
targeting (targets) and the variants sit with lora; adapters on disk and PEFT build on lora; the contract
checker runs save/load and PEFT round trips, so it comes after them; training knows LoRA only for LoRA+;
serving many adapters in one batch (multi_adapter) builds on the adapters, data-parallel plumbing
(distributed) sits under train, and the scale-out measurements (scaling) use training and serving.
The package's __init__ imports everything and is not part of the order. The test reads the source (ast),
so an import inside a function counts too.
"""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lora_lab"
LAYERS = [
    ("files", "errors"), ("data", "tasks"), ("model",), ("sampling", "adapter_layers"), ("targets", "fused"), ("lora",),
    ("variants",), ("checkpoint",), ("adapters",), ("peft_interop", "multi_adapter"), ("contract",), ("distributed",),
    ("train",), ("pretrained",), ("protocol",), ("finetune", "scaling", "costs"), ("outputs",), ("widgets",), ("exercises", "tour"), ("cli",),
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def module_of(path: Path) -> str:
    """lora_lab/lora.py -> "lora"; every file of the variants package -> "variants"."""
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def imports(path: Path, source: str):
    """(imported lora_lab module, [imported names], line) for each lora_lab import in `source` (the file at path)."""
    package_depth = len(path.relative_to(PACKAGE).parts) - 1  # 0 for lora_lab/x.py, 1 for lora_lab/variants/x.py
    for node in ast.walk(ast.parse(source, str(path))):
        if isinstance(node, ast.ImportFrom) and node.level:
            up = node.level - 1 - package_depth  # < 0: inside a subpackage
            names = [a.name for a in node.names]
            if up < 0:  # e.g. "from .dora import X" inside variants/
                yield module_of(path), names, node.lineno
            elif node.module:
                yield node.module.split(".")[0], names, node.lineno
            else:  # "from . import tasks"
                for name in names:
                    yield name, [], node.lineno
        elif isinstance(node, ast.Import) and any(a.name.startswith("lora_lab") for a in node.names):
            for a in node.names:
                parts = a.name.split(".")
                if len(parts) > 1:
                    yield parts[1], [], node.lineno


SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


def test_every_module_is_placed_in_the_order():
    unplaced = sorted({module_of(p) for p in SOURCES} - set(RANK))
    assert not unplaced, f"add {unplaced} to LAYERS in tests/test_layering.py (and its docstring)"


def violations(path: Path, source: str) -> list[str]:
    me, found = module_of(path), []
    for target, names, line in imports(path, source):
        where = f"{path.relative_to(PACKAGE)}:{line}"
        private = [n for n in names if n.startswith("_")]
        if private:
            found.append(f"{where} imports private name(s) {private} from {target}: publish them instead")
        if target == me:
            continue  # inside one module or package
        if target not in RANK:
            found.append(f"{where} imports unknown module {target}")
        elif RANK[target] >= RANK[me]:
            found.append(f"{where}: {me} (layer {RANK[me]}) imports {target} (layer {RANK[target]}), "
                         "against the order data -> model -> lora -> ... -> cli")
    return found


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_follow_the_order_and_skip_private_names(path):
    assert violations(path, path.read_text()) == []


def test_the_checker_catches_both_kinds_of_violation():
    lora, dora = PACKAGE / "lora.py", PACKAGE / "variants" / "dora.py"
    assert violations(lora, "from .targets import select_targets\nfrom .errors import LoRAError\n") == []
    bad = violations(lora, "from .widgets import RankDashboard\nfrom .targets import _secret\n"
                           "def f():\n    from .adapters import save_adapter\n")
    assert len(bad) == 3 and "lora (layer" in bad[0] and "_secret" in bad[1] and "adapters" in bad[2]
    assert violations(dora, "from ..lora import LoRALinear\nfrom .pissa import PiSSALinear\n") == []
    assert "imports adapters" in violations(dora, "from ..adapters import save_adapter\n")[0]
