"""`make lab`, the README's first command, starts JupyterLab on notebook 00 with widgets."""

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request

from nsa_tutorial.course.notebooks import ROOT


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(url: str):
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(url, timeout=5) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, b""


def test_make_lab_serves_the_course():
    port, token = free_port(), "course-test-token"
    args = f"--no-browser --port={port} --ServerApp.ip=127.0.0.1 --IdentityProvider.token={token}"
    lab = subprocess.Popen(
        ["make", "lab", f"LAB_ARGS={args}"],
        cwd=ROOT,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                status, _, body = get(f"{base}/api/status?token={token}")
                if status == 200:
                    break
            except OSError:
                pass
            assert lab.poll() is None, "make lab exited before JupyterLab answered"
            assert time.monotonic() < deadline, "JupyterLab did not answer within 120 s"
            time.sleep(1)
        assert "started" in json.loads(body)
        status, headers, _ = get(f"{base}/?token={token}")
        assert status == 302
        assert headers["Location"].startswith("/lab/tree/notebooks/00_welcome.ipynb")
        _, _, body = get(f"{base}/lab/api/extensions?token={token}")
        names = {extension["name"] for extension in json.loads(body)}
        assert "jupyter-widgets-jupyterlab-manager" in names, names
        _, _, body = get(f"{base}/api/contents/notebooks?token={token}")
        assert "00_welcome.ipynb" in {item["name"] for item in json.loads(body)["content"]}
    finally:
        os.killpg(lab.pid, signal.SIGTERM)
        lab.wait(timeout=30)
