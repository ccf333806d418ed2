"""Start a private JupyterLab server and a headless Chromium to drive it, and stop both afterwards.

Everything lives in one temporary folder: the notebooks the server shows (its root_dir), Jupyter's
config/data/runtime folders, JupyterLab's settings and workspaces, IPython's profile and the browser
profile, so a run never reads or changes the user's own settings. The server listens on 127.0.0.1 only,
on a free port, behind a random token; `stop()` shuts it down with its kernels, also after a failure.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

# Debian's chromium, run as root with no network: no sandbox (root), no GPU, and none of the background
# services that would try to reach the (closed) network. The profile folder is passed separately.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-proxy-server",  # the page is on 127.0.0.1: never route it through an http_proxy from the environment
]
INSTALL_HINT = (
    "install them with `apt-get install -y chromium` (or set LORA_LAB_CHROMIUM to a Chromium/Chrome binary) "
    'and `pip install playwright` (part of the test extra: pip install -e ".[test]")'
)

# JupyterLab settings for a quiet, fully rendered page: every cell stays in the DOM (no windowing, so
# cells far down the notebook can be read), and no news or update pop-ups that ask to reach the network.
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false", "checkForUpdates": False},
}


class BrowserToolsMissing(RuntimeError):
    """Playwright for Python or a Chromium binary is not installed."""


def find_chromium() -> str:
    """The Chromium binary to drive: $LORA_LAB_CHROMIUM, else `chromium` on PATH (Debian's package)."""
    chosen = os.environ.get("LORA_LAB_CHROMIUM")
    if chosen:  # named explicitly: use it or say what is wrong with it, never silently another one
        if not (os.path.isfile(chosen) and os.access(chosen, os.X_OK)):
            raise BrowserToolsMissing(f"LORA_LAB_CHROMIUM={chosen} is not an executable file; {INSTALL_HINT}")
        return chosen
    for path in (shutil.which("chromium"), "/usr/bin/chromium"):
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise BrowserToolsMissing(f"no `chromium` found on PATH or at /usr/bin/chromium; {INSTALL_HINT}")


def check_browser_tools() -> str:
    """The Chromium path, once both it and Playwright are importable; BrowserToolsMissing says what is not."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        raise BrowserToolsMissing(f"Playwright for Python is not installed; {INSTALL_HINT}") from None
    return find_chromium()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Requests to our own server must not go through a proxy named in the environment.
_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class JupyterLab:
    """A running JupyterLab server; `root` is the folder it shows."""

    process: subprocess.Popen
    url: str  # http://127.0.0.1:PORT
    token: str
    root: Path
    log: Path

    def notebook_url(self, name: str) -> str:
        return f"{self.url}/lab/tree/{name}?reset&token={self.token}"  # reset: only this notebook open

    def api(self, path: str, method: str = "GET", timeout: float = 5, with_token: bool = True) -> dict | list:
        """The server's REST API (sessions, kernels, shutdown, ...), parsed from JSON."""
        headers = {"Authorization": f"token {self.token}"} if with_token else {}
        request = urllib.request.Request(f"{self.url}/api/{path}", method=method, headers=headers)
        with _LOCAL.open(request, timeout=timeout) as response:
            body = response.read()
        return json.loads(body) if body else {}

    def kernel_ready(self, notebook: str) -> bool:
        """Whether the kernel of `notebook`'s session is started, idle and connected to the page."""
        kernels = [s["kernel"] for s in self.api("sessions") if s.get("path") == notebook and s.get("kernel")]
        return any(k["execution_state"] == "idle" and k["connections"] > 0 for k in kernels)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else "(no log)"

    def stop(self) -> None:
        """Shut the server down with its kernels; whatever is left after 20 s is killed. Safe to call twice."""
        if self.process.poll() is not None:
            return  # already stopped (and reaped: its pid may belong to someone else by now)
        kernels = psutil.Process(self.process.pid).children(recursive=True)  # each in a process group of its own
        try:
            self.api("shutdown", method="POST")  # the server stops its kernels, then itself
        except OSError:  # urllib's errors are OSErrors
            pass
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)  # the server and anything left in its group
            self.process.wait(timeout=10)
        for kernel in kernels:
            try:
                kernel.kill()  # psutil checks the start time first: never a recycled pid
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(kernels, timeout=10)


def _private_environment(workdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    dirs = {
        "JUPYTER_CONFIG_DIR": workdir / "jupyter" / "config",
        "JUPYTER_DATA_DIR": workdir / "jupyter" / "data",
        "JUPYTER_RUNTIME_DIR": workdir / "jupyter" / "runtime",
        "JUPYTERLAB_SETTINGS_DIR": workdir / "jupyter" / "lab-settings",
        "JUPYTERLAB_WORKSPACES_DIR": workdir / "jupyter" / "lab-workspaces",
        "IPYTHONDIR": workdir / "ipython",
        "MPLCONFIGDIR": workdir / "matplotlib",
    }
    for name, path in dirs.items():
        path.mkdir(parents=True, exist_ok=True)
        env[name] = str(path)
    for relative, settings in LAB_SETTINGS.items():
        target = dirs["JUPYTERLAB_SETTINGS_DIR"] / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(settings))
    env["JUPYTER_PLATFORM_DIRS"] = "1"  # the new-style paths, without jupyter_core's deprecation warning
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.pop("MPLBACKEND", None)  # a test run's Agg would hide plots; kernels pick their inline default
    return env


def start_jupyterlab(workdir: Path, timeout: float = 60) -> JupyterLab:
    """Start JupyterLab on 127.0.0.1 with a random token, showing `workdir/notebooks`; wait until it answers."""
    root = workdir / "notebooks"
    root.mkdir(parents=True, exist_ok=True)
    env = _private_environment(workdir)
    port, token = _free_port(), secrets.token_hex(24)
    log = workdir / "jupyterlab.log"
    command = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        "--allow-root",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
    ]
    with open(log, "wb") as log_file:
        # A session of its own: stop() can end the server and everything it started as one group.
        process = subprocess.Popen(
            command,
            cwd=root,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    lab = JupyterLab(process, f"http://127.0.0.1:{port}", token, root, log)
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(
                f"JupyterLab exited with code {process.returncode} before it was ready:\n{lab.log_tail()}"
            )
        try:
            lab.api("status", timeout=2)
            return lab
        except OSError:  # not listening yet (urllib's errors are OSErrors)
            pass
        if time.monotonic() > deadline:
            lab.stop()
            raise RuntimeError(f"JupyterLab did not answer within {timeout:.0f} s:\n{lab.log_tail()}")
        time.sleep(0.25)


@contextmanager
def chromium_page(chromium: str, workdir: Path):
    """A Playwright page in a headless Chromium with a fresh profile under `workdir`; closed on exit."""
    from playwright.sync_api import sync_playwright

    # Besides its profile, Chromium writes crash reports and dconf state under the XDG folders (by default
    # in the user's home): point them into the temporary folder too.
    env = dict(os.environ)
    for name in ("XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_DATA_HOME", "XDG_RUNTIME_DIR"):
        folder = workdir / "chromium-home" / name.lower()
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        env[name] = str(folder)
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(workdir / "chromium-profile"),
            executable_path=chromium,
            headless=True,
            args=CHROMIUM_ARGS,
            env=env,
            viewport={"width": 1400, "height": 1000},
        )
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()


# ----------------------------------------------------------------------------------------------------
# Driving a notebook in the JupyterLab page


def notebook_without_outputs(path: Path) -> dict:
    """The notebook at `path` with every output, execution count and saved widget state removed, so all
    the page shows after a run comes from the live kernel."""
    notebook = json.loads(path.read_text())
    notebook.get("metadata", {}).pop("widgets", None)
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
    return notebook


def open_notebook(page, lab: JupyterLab, name: str, timeout: float = 60):
    """Open `name` in JupyterLab, wait until its kernel is started, connected and idle; return its panel."""
    page.goto(lab.notebook_url(name))
    panel = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")  # the notebook in front
    panel.locator(".jp-Notebook").wait_for(timeout=timeout * 1000)
    # The page shows "idle" before the kernel exists; the server knows when it is really there.
    deadline = time.monotonic() + timeout
    while not lab.kernel_ready(name):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the kernel for {name} did not start within {timeout:.0f} s:\n{lab.log_tail()}")
        time.sleep(0.2)
    panel.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").wait_for(timeout=timeout * 1000)
    return panel


# Done: no cell waiting or running, and at least one has run (an error stops "run all" early).
_RUN_FINISHED = """panel => {
    const prompts = [...panel.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')].map(p => p.textContent);
    return prompts.some(p => /\\[\\d+\\]/.test(p)) && !prompts.some(p => p.includes('*'));
}"""


def run_all_cells(page, panel, timeout: float = 90) -> None:
    """Run > Run All Cells, as a user would; fail with the notebook's error output if a cell fails."""
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
    page.wait_for_function(_RUN_FINISHED, arg=panel.element_handle(), timeout=timeout * 1000, polling=250)
    prompts = panel.locator(".jp-CodeCell .jp-InputArea-prompt").all_text_contents()
    not_run = [i for i, p in enumerate(prompts) if not any(ch.isdigit() for ch in p)]
    if not_run:
        errors = panel.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
        raise AssertionError(f"code cells {not_run} did not run; error output:\n" + "\n".join(errors.all_inner_texts()))


def code_cell(panel, source_snippet: str):
    """The code cell of `panel` whose source contains `source_snippet`."""
    return panel.locator(".jp-CodeCell", has=panel.page.locator(".jp-InputArea-editor", has_text=source_snippet))


def picture_source(box) -> str | None:
    """The data URL of the (first) image inside a widget box, or None before it has one."""
    image = box.locator("img")
    return image.first.get_attribute("src") if image.count() else None


def wait_for_new_picture(page, box, before: str | None, timeout: float = 30) -> None:
    """Wait until the image in `box` differs from `before` (an Output widget replaces its <img> on redraw)."""
    page.wait_for_function(
        "([box, before]) => { const img = box.querySelector('img'); return img !== null && img.src !== before; }",
        arg=[box.element_handle(), before],
        timeout=timeout * 1000,
    )
