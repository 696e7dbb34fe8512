"""The explorer in a real JupyterLab: a server on localhost, Debian's chromium driven by Playwright, the explorer
cells of notebook 08 run in the smoke profile, one control moved, a screenshot saved, the DOM checked.

Skips with the reason when Playwright, chromium or JupyterLab is missing (./run_tests.sh installs chromium where apt
and root are available; Playwright is pinned in requirements-dev.txt and uses the system browser, never a download).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from lib.report import results_dir

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "08_masks_and_restorations.ipynb"
TIMEOUT_MS = 120_000


def _chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)


def _requirements() -> str | None:
    """Why the test cannot run here, or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -r requirements-dev.txt)"
    if _chromium() is None:
        return "chromium is not installed (apt-get install chromium; ./run_tests.sh does it where apt and root exist)"
    try:
        import jupyterlab  # noqa: F401
    except ImportError:
        return "jupyterlab is not installed"
    return None


pytestmark = [pytest.mark.slow, pytest.mark.skipif(_requirements() is not None, reason=str(_requirements()))]


def _explorer_notebook(path: Path) -> None:
    """Notebook 08's parameters cell (set to the smoke profile) and its cells tagged 'explorer', without outputs."""
    nb = json.loads(NOTEBOOK.read_text())
    cells = []
    for cell in nb["cells"]:
        tags = cell.get("metadata", {}).get("tags", [])
        if "parameters" in tags:
            cell = {**cell, "source": 'profile = "smoke"\n'}
        elif "explorer" not in tags:
            continue
        cells.append({**cell, "outputs": [], "execution_count": None})
    assert len(cells) >= 3, "notebook 08 lost its parameters cell or its cells tagged 'explorer'"
    path.write_text(json.dumps({**nb, "cells": cells}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_server(url: str, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"jupyter lab did not answer at {url} within {timeout:.0f} s")


@pytest.fixture
def jupyter_lab(tmp_path):
    """A JupyterLab server on localhost serving tmp_path/explorer.ipynb; stopped (with its kernels) afterwards."""
    _explorer_notebook(tmp_path / "explorer.ipynb")
    port, token = _free_port(), "explorer-test"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ADV_DATA_DOWNLOAD": "0",
           "ADV_RESULTS_DIR": str(tmp_path / "results"), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "JUPYTER_CONFIG_DIR": str(tmp_path / "jupyter-config"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
           "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces")}
    env.pop("MPLBACKEND", None)
    log = open(tmp_path / "jupyter.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root", "--ip=127.0.0.1",
                             f"--port={port}", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp_path}",
                             "--LabApp.expose_app_in_browser=True", "--ServerApp.open_browser=False"],
                            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_for_server(f"{base}/api/status?token={token}", proc)
        yield base, token
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        log.close()


KERNEL_IDLE = """() => {
  const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
  return Boolean(k) && k.status === 'idle';
}"""
IMAGE_READY = """(old) => {
  const img = document.querySelector('.adv-explorer img.adv-explorer-image');
  return Boolean(img) && img.complete && img.naturalWidth > 0 && img.src !== old;
}"""


def test_explorer_runs_in_jupyterlab_and_reacts_to_a_control(jupyter_lab):
    from playwright.sync_api import sync_playwright

    base, token = jupyter_lab
    screenshot = results_dir("smoke", "08_masks_and_restorations") / "figures" / "explorer_browser.png"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=_chromium(),
                                     args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(f"{base}/lab/tree/explorer.ipynb?token={token}", timeout=TIMEOUT_MS)
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=TIMEOUT_MS)
            page.add_style_tag(content=".Toastify { display: none !important; }")   # JupyterLab's news toast
            page.wait_for_function(KERNEL_IDLE, timeout=TIMEOUT_MS)
            page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
            page.wait_for_function(IMAGE_READY, arg="", timeout=TIMEOUT_MS)
            errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.error']")
            assert errors.count() == 0, errors.first.inner_text()

            explorer = page.locator(".adv-explorer")
            assert explorer.count() == 1
            labels = [t.strip() for t in explorer.locator(".widget-dropdown label").all_inner_texts()]
            assert labels == ["dataset", "attack", "epsilon", "defense"]
            assert explorer.locator("input[type='number']").count() == 1      # the image index
            assert explorer.locator("button", has_text="random image").count() == 1
            before = explorer.locator("img.adv-explorer-image").get_attribute("src")

            # by position (the labels above): a defense option such as "ARN (attack-invariant ...)" also says "attack"
            attack = explorer.locator(".widget-dropdown").nth(labels.index("attack")).locator("select")
            options = attack.locator("option").all_inner_texts()
            new = next(o for o in options if o != attack.input_value())
            attack.select_option(label=new)
            page.wait_for_function(IMAGE_READY, arg=before, timeout=TIMEOUT_MS)
            assert attack.input_value() == new
            assert "refused" not in explorer.locator(".adv-explorer-message").inner_text()
            size = page.evaluate("() => { const i = document.querySelector('.adv-explorer img.adv-explorer-image');"
                                 " return [i.naturalWidth, i.naturalHeight]; }")
            assert size[0] > 300 and size[1] > 200                               # images and bars, not an icon
            explorer.scroll_into_view_if_needed()
            explorer.screenshot(path=str(screenshot))
        finally:
            browser.close()
    assert screenshot.stat().st_size > 10_000
