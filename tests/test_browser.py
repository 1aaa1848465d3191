"""The course in a real browser: JupyterLab, headless Chromium. The mask explorer with a
slider moved, and a Chinese notebook whose characters and verdict symbols are drawn.

Needs Debian's chromium and its CJK and emoji fonts (`make test` installs them with
apt-get when they are missing: a bare Debian has neither font, and Chromium would draw
empty boxes); Playwright drives it through its executable, not a browser download.
"""

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

from nsa_tutorial.course.language import LANGUAGE_SETTING
from nsa_tutorial.course.notebooks import ROOT, SOLUTIONS

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOT = ROOT / "build" / "explorer.png"
CHINESE_SCREENSHOT = ROOT / "build" / "chinese.png"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
# Whether each text draws differently from a private-use character that no font has (an
# empty box): a missing font draws the same box for every character.
DRAWN = """(texts) => {
    const canvas = document.createElement('canvas');
    canvas.width = canvas.height = 64;
    const context = canvas.getContext('2d');
    const markdown = document.querySelector('.jp-RenderedMarkdown');
    context.font = `40px ${getComputedStyle(markdown).fontFamily}`;
    const ink = (text) => {
        context.clearRect(0, 0, 64, 64);
        context.fillText(text, 4, 48);
        return Array.from(context.getImageData(0, 0, 64, 64).data);
    };
    const box = ink('\\uE000');
    return texts.map((text) => ink(text).some((value, i) => value !== box[i]));
}"""
LAST_IMAGE_CHANGED = """(before) => {
    const images = document.querySelectorAll('.jupyter-widgets img');
    return images.length > 0 && images[images.length - 1].src !== before;
}"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def lab(tmp_path, request):
    """JupyterLab on a copy of the course (so nothing it saves lands in the repository),
    its kernels speaking the language given as the fixture's parameter (English by default)."""
    language = getattr(request, "param", "en")
    shutil.copytree(SOLUTIONS, tmp_path / "solutions")
    shutil.copytree(ROOT / "notebooks_zh", tmp_path / "notebooks_zh")
    shutil.copytree(ROOT / "benchmarks", tmp_path / "benchmarks")
    port, token = free_port(), "browser-test-token"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            f"--port={port}",
            "--ServerApp.ip=127.0.0.1",
            f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={tmp_path}",
            "--allow-root",
        ],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
             LANGUAGE_SETTING: language},  # fmt: skip
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
            break
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, "JupyterLab did not start"
            time.sleep(1)
    yield base, token
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=30)


@pytest.fixture
def page():
    """A headless Chromium page (the test is skipped without Debian's chromium)."""
    if not Path(CHROMIUM).exists():
        pytest.skip("needs Debian's chromium (make test installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield browser.new_page(viewport={"width": 1200, "height": 1400})
        browser.close()


def open_and_run_all(page, url: str, ready: str) -> None:
    """Open a notebook, wait for `ready` (a selector) and the kernel, then Run All Cells."""
    page.goto(url)
    page.wait_for_selector(ready, timeout=60_000)
    # the status bar reads "Python 3 (ipykernel) | Idle" once the kernel is ready
    page.wait_for_function("() => document.body.innerText.includes('| Idle')", timeout=120_000)
    page.click("li.lm-MenuBar-item:has-text('Run')")
    page.click("li.lm-Menu-item:has-text('Run All Cells')")


def test_explorer_renders_and_a_slider_redraws_it(page, lab):
    base, token = lab
    url = f"{base}/lab/tree/solutions/06_gating_assembly.ipynb?token={token}"
    open_and_run_all(page, url, ".jp-Notebook")
    page.wait_for_selector(".widget-slider", timeout=180_000)  # widgets, not their text form
    image = page.locator(".jupyter-widgets img").last
    image.wait_for(timeout=60_000)
    before = image.get_attribute("src")
    handle = page.locator(".widget-slider:has(label:has-text('query')) .noUi-handle").last
    handle.focus()
    for _ in range(10):
        page.keyboard.press("ArrowLeft")
    page.wait_for_function(LAST_IMAGE_CHANGED, arg=before, timeout=60_000)
    page.wait_for_selector(".widget-html:has-text('query 85')", timeout=60_000)
    news = page.get_by_role("button", name="No")  # the "get Jupyter news?" pop-up
    if news.count():
        news.first.click()
        news.first.wait_for(state="detached")
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.locator(".jp-OutputArea-output:has(.widget-slider)").last.screenshot(path=SCREENSHOT)
    assert SCREENSHOT.stat().st_size > 10_000


@pytest.mark.parametrize("lab", ["zh"], indirect=True)
def test_chinese_notebook_draws_its_characters_and_verdicts(page, lab):
    base, token = lab
    url = f"{base}/lab/tree/notebooks_zh/05_sliding_window.ipynb?reset&token={token}"
    open_and_run_all(page, url, "h1:has-text('滑动窗口')")
    # the exercises are stubs: their check cells answer "not implemented yet"
    verdict = page.locator(".jp-OutputArea-output:has-text('⏳')").locator("visible=true")
    verdict.first.wait_for(timeout=180_000)
    said = verdict.first.inner_text()
    drawn = page.evaluate(DRAWN, ["滑", "⏳", "✅", "\U0010fffd"])
    CHINESE_SCREENSHOT.parent.mkdir(exist_ok=True)
    verdict.first.scroll_into_view_if_needed()
    page.screenshot(path=CHINESE_SCREENSHOT)
    assert drawn == [True, True, True, False], "a CJK or emoji font is missing (make test)"
    assert any("\u4e00" <= ch <= "\u9fff" for ch in said), f"the verdict is not Chinese: {said}"
