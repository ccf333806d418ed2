"""The notebook widgets in a real browser: JupyterLab, driven through headless Chromium by Playwright.

The unit tests in test_widgets.py set `.value` from Python; this checks the other half: that the widgets
render in JupyterLab and that moving a slider in the page makes the kernel recompute and the page show
the new numbers. Each test opens a notebook, runs every cell from the Run menu, presses a key on the
rank slider's handle and compares the text on the page with numbers lora_lab computes in this process.

- Chapter 01 runs as it is (its outputs removed first, so whatever the page shows comes from the run).
- Chapter 07 fine-tunes the cached pretrained base for every setting, too slow for this test. A small
  notebook builds the real RankDashboard on a tiny base instead (tests/e2e/toy_rank_setup.py), with every
  rank precomputed so the slider move is instant.

Needs Chromium (Debian's `chromium`) and Playwright for Python; without them the tests skip, saying how to
install them, unless LORA_LAB_REQUIRE_BROWSER=1 (set by .ci/run), which makes that a failure.
"""

import json
import math
import os
import shutil
import sys
import urllib.error
from pathlib import Path

import nbformat
import psutil
import pytest
import torch
from e2e import toy_rank_setup as toy
from e2e.lab_session import (
    BrowserToolsMissing,
    check_browser_tools,
    chromium_page,
    code_cell,
    notebook_without_outputs,
    open_notebook,
    picture_source,
    run_all_cells,
    start_jupyterlab,
    wait_for_new_picture,
)

from lora_lab import LoRAConfig
from lora_lab import finetune as ft
from lora_lab.course import numerics, widgets

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
SECOND = 1000  # Playwright counts milliseconds


def chromium_or_skip() -> str:
    """The Chromium to drive; without it (or Playwright) skip, or fail where LORA_LAB_REQUIRE_BROWSER=1 (CI)."""
    try:
        return check_browser_tools()
    except BrowserToolsMissing as missing:
        if os.environ.get("LORA_LAB_REQUIRE_BROWSER") == "1":
            pytest.fail(f"LORA_LAB_REQUIRE_BROWSER=1 but {missing}")
        pytest.skip(str(missing))


@pytest.fixture(scope="module")
def chromium() -> str:
    return chromium_or_skip()


@pytest.fixture(scope="module")
def lab(chromium, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("jupyterlab")
    server = start_jupyterlab(workdir)
    yield server
    server.stop()  # also after a failed test: a fixture's teardown always runs


@pytest.fixture(scope="module")
def page(chromium, lab):
    with chromium_page(chromium, lab.root.parent) as browser_page:
        browser_page.set_default_timeout(30 * SECOND)
        yield browser_page


def numbers_text(widget) -> str:
    """What an HTML widget's value reads as on the page (its tags rendered away)."""
    return widget.numbers.value.replace("<b>", "").replace("</b>", "")


def test_a_missing_browser_skips_with_how_to_install_it_or_fails_in_ci(monkeypatch, tmp_path):
    monkeypatch.setenv("LORA_LAB_CHROMIUM", str(tmp_path / "no-chromium-here"))
    monkeypatch.delenv("LORA_LAB_REQUIRE_BROWSER", raising=False)
    with pytest.raises(pytest.skip.Exception) as skipped:
        chromium_or_skip()
    assert "apt-get install -y chromium" in str(skipped.value) and "pip install playwright" in str(skipped.value)
    monkeypatch.setenv("LORA_LAB_REQUIRE_BROWSER", "1")
    with pytest.raises(pytest.fail.Exception, match="LORA_LAB_REQUIRE_BROWSER=1 but .*no-chromium-here"):
        chromium_or_skip()
    monkeypatch.setitem(sys.modules, "playwright.sync_api", None)  # as if Playwright were not installed
    with pytest.raises(pytest.fail.Exception, match="Playwright for Python is not installed.*pip install playwright"):
        chromium_or_skip()


def test_jupyterlab_wants_the_token_and_stops_with_its_kernels(tmp_path):
    server = start_jupyterlab(tmp_path)
    try:
        assert server.url.startswith("http://127.0.0.1:")
        # Its runtime files sit in the temporary folder, not in the user's Jupyter folders.
        assert list((tmp_path / "jupyter" / "runtime").glob("jpserver-*.json"))
        with pytest.raises(urllib.error.HTTPError) as refused:
            server.api("kernels", with_token=False)
        assert refused.value.code == 403
        server.api("kernels", method="POST")  # start a kernel, as opening a notebook does
        kernels = psutil.Process(server.process.pid).children(recursive=True)
        assert kernels
    finally:
        server.stop()
    assert server.process.poll() is not None
    assert not [k.pid for k in kernels if k.is_running()]


def test_low_rank_explorer_slider_in_jupyterlab(lab, page, tmp_path):
    name = "01_low_rank.ipynb"
    (lab.root / name).write_text(json.dumps(notebook_without_outputs(NOTEBOOKS / name)))
    notebook = open_notebook(page, lab, name)
    run_all_cells(page, notebook)

    explorer_box = code_cell(notebook, "widgets.LowRankExplorer(").locator(".widget-vbox").first
    numbers = explorer_box.locator(".widget-html-content")
    handle = explorer_box.locator(".noUi-handle")
    # The chapter moves the slider to 20 from code; the page must show that before we touch it.
    page.wait_for_function("el => el.textContent.startsWith('rank 20:')", arg=numbers.element_handle())
    assert float(handle.get_attribute("aria-valuenow")) == 20
    drawn_before = picture_source(explorer_box)

    handle.focus()
    handle.press("ArrowRight")
    page.wait_for_function("el => el.textContent.startsWith('rank 21:')", arg=numbers.element_handle())
    wait_for_new_picture(page, explorer_box, drawn_before)  # the plot is redrawn too
    page.screenshot(path=str(tmp_path / "low_rank_explorer.png"), full_page=True)
    shown = numbers.text_content()

    # What lora_lab computes for rank 21 of the same picture, from the singular values and from the factors.
    matrix = numerics.synthetic_image(96).double()
    d, k = matrix.shape
    singular_values = torch.linalg.svdvals(matrix)
    error = float(torch.linalg.matrix_norm(matrix - numerics.low_rank_approximation(matrix, 21)))
    predicted = numerics.eckart_young_error(singular_values, 21)
    assert math.isclose(error, predicted, rel_tol=1e-9)
    for expected in (
        f"rank 21: error {error:.4f}",
        f"predicted from the singular values: {predicted:.4f}",
        f"relative error {error / float(torch.linalg.matrix_norm(matrix)):.1%}",
        f"stores {21 * (d + k):,} numbers instead of {d * k:,}",
        f"({d * k / (21 * (d + k)):.1f}x fewer)",
    ):
        assert expected in shown, f"{expected!r} not in the page's {shown!r}"
    # And exactly what the widget itself renders at that rank.
    explorer = widgets.LowRankExplorer(matrix, r=20, name="picture")
    explorer.rank.value = 21
    assert shown == numbers_text(explorer)
    assert float(handle.get_attribute("aria-valuenow")) == 21


def rank_explorer_notebook() -> nbformat.NotebookNode:
    setup = """\
import torch

from lora_lab.course import widgets
import toy_rank_setup as toy

torch.set_num_threads(1)  # the test recomputes these numbers in one thread: the same arithmetic
base, task, tokenizer, train_config = toy.toy_setup()
dashboard = widgets.RankDashboard(base, task, tokenizer, train_config, ranks=toy.RANKS, r=toy.START_RANK,
                                  groups=toy.GROUPS, alpha=toy.ALPHA)
# Every rank the slider offers, fine-tuned now: moving the slider then reads the cache, instantly.
dashboard.compute_all([(r, toy.GROUPS) for r in toy.RANKS])
display(dashboard)
"""
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    notebook.cells = [
        nbformat.v4.new_markdown_cell("# The rank explorer on a tiny base (browser test)"),
        nbformat.v4.new_code_cell(setup),
    ]
    return notebook


def test_rank_explorer_slider_in_jupyterlab(lab, page, tmp_path):
    name = "rank_explorer.ipynb"
    shutil.copy(Path(toy.__file__), lab.root / "toy_rank_setup.py")
    (lab.root / name).write_text(nbformat.writes(rank_explorer_notebook()))
    notebook = open_notebook(page, lab, name)
    run_all_cells(page, notebook, timeout=90)

    dashboard_box = code_cell(notebook, "widgets.RankDashboard(").locator(".widget-vbox").first
    numbers = dashboard_box.locator(".widget-html-content")
    handle = dashboard_box.locator(".widget-hslider .noUi-handle")
    base, task, tokenizer, train_config = toy.toy_setup()
    targets = tuple(t for group in toy.GROUPS for t in numerics.TARGET_GROUPS[group])
    cfg = base.config
    label = "r={} " + "+".join(toy.GROUPS) + ":"  # how the dashboard names a setting, e.g. "r=2 Wq+Wv:"

    start_params = numerics.transformer_lora_params(cfg.n_layer, cfg.n_embd, toy.START_RANK, targets)
    page.wait_for_function(
        "([el, label]) => el.textContent.startsWith(label)",
        arg=[numbers.element_handle(), label.format(toy.START_RANK)],
    )
    assert f"{start_params:,} trainable parameters" in numbers.text_content()
    drawn_before = picture_source(dashboard_box)

    handle.focus()
    handle.press("ArrowRight")  # the next rank: 2 -> 4
    new_rank = toy.RANKS[toy.RANKS.index(toy.START_RANK) + 1]
    page.wait_for_function(
        "([el, label]) => el.textContent.startsWith(label)", arg=[numbers.element_handle(), label.format(new_rank)]
    )
    wait_for_new_picture(page, dashboard_box, drawn_before)  # the current choice is ringed anew
    page.screenshot(path=str(tmp_path / "rank_explorer.png"), full_page=True)
    shown = numbers.text_content()

    # The library's own fine-tune of the same setting: its parameter count and its losses.
    result = ft.finetune(
        base, task, tokenizer, LoRAConfig(r=new_rank, alpha=toy.ALPHA, targets=targets), train_config, progress=False
    )
    trainable = numerics.transformer_lora_params(cfg.n_layer, cfg.n_embd, new_rank, targets)
    assert result.trainable_params == trainable
    for expected in (
        f"{trainable:,} trainable parameters",
        f"({trainable / base.num_parameters():.2%} of the base)",
        f"adapter {numerics.format_bytes(trainable * numerics.FP32_BYTES)}",
        f"target loss {result.losses['target']:.3f}",
        f"source loss {result.losses['source']:.3f}",
        "(cached)",  # precomputed: the move did not fine-tune again
    ):
        assert expected in shown, f"{expected!r} not in the page's {shown!r}"
