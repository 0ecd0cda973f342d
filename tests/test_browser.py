"""JupyterLab in a real browser: run notebook 04 and use the dialogue inspector.

JupyterLab runs on 127.0.0.1 (a free port, a token, its own config, settings and runtime folders)
over a copy of the notebooks, so nothing is saved into the sources. Debian's Chromium
(/usr/bin/chromium, installed by `make env`) is driven headless by Playwright; Playwright's own
browser download is never used. The widget must render, not show ipywidgets' "model not found".
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest

from steerkit.runs import REPO_ROOT

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
#: Text ipywidgets shows when a widget cannot render (no front-end extension, or a lost model).
WIDGET_ERRORS = ("Error displaying widget", "model not found", "Loading widget...")
#: User settings for the test's JupyterLab: every cell rendered (the default windowing leaves cells
#: outside the viewport out of the page), no autosave, no news or update checks (offline).
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false", "checkForUpdates": False},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lab:
    """A JupyterLab server started for one test."""

    def __init__(self, root: Path, state: Path) -> None:
        self.root, self.port, self.token = root, free_port(), secrets.token_hex(16)
        for name, value in LAB_SETTINGS.items():
            path = state / "settings" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(value))
        env = {
            **os.environ,
            "JUPYTER_CONFIG_DIR": str(state / "config"),
            "JUPYTER_RUNTIME_DIR": str(state / "runtime"),
            "JUPYTERLAB_SETTINGS_DIR": str(state / "settings"),
            "JUPYTERLAB_WORKSPACES_DIR": str(state / "workspaces"),
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
        }
        self.log = (state / "lab.log").open("w")
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
                f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0",
                f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={root}",
                "--LabApp.expose_app_in_browser=True",
                "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
                "--LabApp.news_url=None", "--LabApp.extension_manager=readonly",
                *(["--allow-root"] if os.geteuid() == 0 else []),
            ],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.wait_ready(state / "lab.log")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}?token={self.token}"

    def wait_ready(self, log_path: Path, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"JupyterLab exited: {log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url("api/status"), timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"JupyterLab did not answer in {timeout} s: {log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


@pytest.fixture
def browser_page(tmp_path: Path):
    """A Playwright page in headless Debian Chromium with a fresh profile; yields (page, factory)."""
    if not CHROMIUM.exists():
        pytest.fail("/usr/bin/chromium is missing: `make chromium` installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM), headless=True,
            args=CHROMIUM_FLAGS, viewport={"width": 1400, "height": 1000},
        )
        page = context.new_page()
        try:
            yield page
        finally:
            context.close()


@pytest.fixture
def lab_over(tmp_path: Path) -> Iterator:
    """Start JupyterLab over a folder; stopped after the test."""
    labs: list[Lab] = []

    def start(root: Path) -> Lab:
        labs.append(Lab(root, tmp_path / "lab-state"))
        return labs[-1]

    yield start
    for lab in labs:
        lab.stop()


# JavaScript run in the page through JupyterLab's exposed application object.
KERNEL_STATUS = "(window.jupyterapp?.shell.currentWidget?.sessionContext?.session?.kernel?.status ?? null)"
CELL_STATE = """() => {
  const nb = window.jupyterapp.shell.currentWidget.content;
  const cells = nb.widgets.filter(c => c.model.type === 'code');
  return {
    pending: cells.filter(c => c.model.executionCount === null || c.promptNode?.textContent.includes('*')).length,
    errors: cells.flatMap(c => c.model.outputs.toJSON().filter(o => o.output_type === 'error')
                                .map(o => `${o.ename}: ${o.evalue}`)),
  };
}"""


def open_and_run_all(page, lab: Lab, notebook: str, timeout_s: float) -> None:
    """Open a notebook, wait for its kernel, run all cells and wait until every cell has run."""
    page.goto(lab.url(f"lab/tree/{notebook}"))
    page.wait_for_function(f"() => {KERNEL_STATUS} === 'idle'", timeout=120_000)
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
    deadline = time.monotonic() + timeout_s
    state = {"pending": -1, "errors": []}
    while time.monotonic() < deadline:
        time.sleep(1)
        state = page.evaluate(CELL_STATE)
        if state["errors"]:
            pytest.fail(f"{notebook}: a cell raised in JupyterLab: {state['errors']}")
        if state["pending"] == 0 and page.evaluate(f"() => {KERNEL_STATUS}") == "idle":
            return
    pytest.fail(f"{notebook}: cells still running after {timeout_s} s ({state})")


def assert_widgets_rendered(page) -> None:
    text = page.inner_text("body")
    shown = [e for e in WIDGET_ERRORS if e in text]
    assert not shown, f"widget did not render: {shown}"


def widget_notebook(folder: Path) -> Path:
    """A small notebook showing an ipywidgets Dropdown that rewrites an HTML widget on change."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(
        "import ipywidgets as w\n"
        "pick = w.Dropdown(options=['first', 'second'], description='dialogue')\n"
        "shown = w.HTML('<p class=\"probe\">showing first</p>')\n"
        "pick.observe(lambda change: setattr(shown, 'value', f'<p class=\"probe\">showing {change.new}</p>'),"
        " names='value')\n"
        "w.VBox([pick, shown])"
    )]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = folder / "widget_probe.ipynb"
    nbformat.write(nb, path)
    return path


def test_ipywidgets_render_and_round_trip(tmp_path: Path, lab_over, browser_page) -> None:
    """The widget front end is installed and talks to the kernel: a change in the page reaches Python
    and comes back as new HTML."""
    root = tmp_path / "root"
    root.mkdir()
    widget_notebook(root)
    lab = lab_over(root)
    page = browser_page
    open_and_run_all(page, lab, "widget_probe.ipynb", timeout_s=60)
    page.wait_for_selector(".probe", timeout=30_000)
    assert_widgets_rendered(page)
    page.select_option(".widget-dropdown select", "second")
    page.wait_for_selector(".probe:has-text('showing second')", timeout=15_000)
    page.screenshot(path=str(tmp_path / "widget_probe.png"))


#: Notebook 04's values in the browser test: its runs in tmp_path, and a bench just big enough for
#: the inspector to list several dialogues of two turns (the test is about the page, not the scores).
ANALYSIS_VALUES = {"n_benign": 2, "n_obfuscated": 4, "n_redteam": 0, "max_turns": 2, "max_tokens": 16,
                   "n_resamples": 50, "figure_png": False}


def analysis_notebook(folder: Path, runs_root: Path) -> Path:
    """A copy of notebook 04 with values added after its parameters cell (as papermill injects them),
    so the repository's papermill_runs/ stays untouched."""
    nb = nbformat.read(REPO_ROOT / "notebooks" / "04_steer_bench_analysis.ipynb", as_version=4)
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    values = {**ANALYSIS_VALUES, "runs_root": str(runs_root)}
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(
        "# injected by the browser test\n" + "\n".join(f"{k} = {v!r}" for k, v in values.items()),
        metadata={"tags": ["injected-parameters"]}))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "04_steer_bench_analysis.ipynb"
    nbformat.write(nb, path)
    return path


@pytest.mark.slow
def test_inspector_renders_and_steps_in_jupyterlab(tmp_path: Path, lab_over, browser_page) -> None:
    """Notebook 04 runs in JupyterLab; in its inspector a second dialogue is selected and stepped to
    its next turn, and the dialogue HTML follows."""
    root = tmp_path / "root"
    analysis_notebook(root / "notebooks", tmp_path / "runs")
    lab = lab_over(root)
    page = browser_page
    open_and_run_all(page, lab, "notebooks/04_steer_bench_analysis.ipynb", timeout_s=900)
    dialogue_list = page.locator(".widget-select select").last
    dialogue_list.wait_for(timeout=60_000)
    assert_widgets_rendered(page)
    view = page.locator(".widget-html-content:has(.steerkit-dialogue)").last
    assert view.is_visible() and "turn 1 of" in view.inner_text()

    options = dialogue_list.locator("option")
    assert options.count() >= 2, "the inspector lists fewer than two dialogues"
    second = dialogue_list.evaluate("el => el.options[1].textContent")  # "<label> · <dialogue id> · ..."
    dialogue_list.select_option(index=1)
    page.wait_for_function(
        "([el, text]) => el.selectedOptions.length && el.selectedOptions[0].textContent === text",
        arg=[dialogue_list.element_handle(), second], timeout=15_000,
    )
    page.get_by_role("button", name="turn ▶").last.click()
    page.locator(".steerkit-dialogue .turn[data-turn='2']").last.wait_for(timeout=15_000)
    shot = tmp_path / "inspector_screenshot.png"
    dialogue_list.scroll_into_view_if_needed()
    page.screenshot(path=str(shot), full_page=False)
    figures = REPO_ROOT / "figures"  # for the record; figures/ is git-ignored
    if figures.is_dir():
        shutil.copyfile(shot, figures / "inspector_screenshot.png")
    text = view.inner_text()
    assert "turn 2 of" in text, f"after selecting {second!r} and stepping: {text[:500]}"
    assert dialogue_list.evaluate("el => el.selectedOptions[0].textContent") == second
    dialogue_id = second.replace("\xa0", " ").split(" · ")[1]  # ipywidgets shows spaces as no-break spaces
    assert dialogue_id in text, f"the view does not show {second!r}: {text[:300]}"
    assert_widgets_rendered(page)
