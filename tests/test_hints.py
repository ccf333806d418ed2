"""Every install hint lora_lab prints must work: an extra it names exists in pyproject.toml."""

import re
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]


def test_every_extra_named_in_a_hint_exists():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    named = {}
    for path in [*(ROOT / "lora_lab").rglob("*.py"), ROOT / "README.md"]:
        for extra in re.findall(r"lora-lab\[([\w,-]+)\]", path.read_text()):
            for name in extra.split(","):
                named.setdefault(name, []).append(path.name)
    assert "peft" in named  # the PEFT interop hint is still there to check
    missing = {name: where for name, where in named.items() if name not in extras}
    assert not missing, f"hints name extras that pyproject.toml does not define: {missing}"
    assert any(req.lower().startswith("peft") for req in extras["peft"])
