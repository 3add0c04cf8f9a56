"""Image inputs that used to hang or crash: pipes, devices, huge files, slow or misbehaving servers.

Each is tried through `pixtral_mlx.images.load_image` and through the real `pixtral-mlx describe`
(which checks every image before it loads a model), against a local HTTP server in a thread.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

import pixtral_mlx.fetch as fetch
import pixtral_mlx.images as images
from pixtral_mlx.images import ImageError, load_image

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore"}
TIMEOUT = 1.5  # seconds: the whole-download bound used in these tests (60 in the product)


def png_bytes(w: int = 24, h: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), 200, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


PNG = png_bytes()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:  # keep pytest's output clean
        pass

    def _send(self, code: int, body: bytes = b"", **headers: str) -> None:
        self.send_response(code)
        for k, v in {"Content-Length": str(len(body)), **headers}.items():
            self.send_header(k.replace("_", "-"), v)
        self.end_headers()
        self.wfile.write(body)

    def _trickle(self, data: bytes, every: float = 0.3) -> None:
        """Send `data` a byte at a time, until it is sent or the client goes away (at most 60 s)."""
        end = time.monotonic() + 60
        try:
            for b in data:
                self.wfile.write(bytes([b]))
                self.wfile.flush()
                time.sleep(every)
                if time.monotonic() > end:
                    return
        except OSError:  # the client hung up: what the tests want
            return

    def do_GET(self) -> None:
        path = self.path
        if path == "/ok.png":
            self._send(200, PNG, Content_Type="image/png")
        elif path == "/trickle-body":  # a valid image, one byte every 0.3 s
            self.send_response(200)
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            self._trickle(PNG)
        elif path == "/trickle-chunked":  # no length: the body just ends when the connection does
            self.protocol_version = "HTTP/1.0"
            self.send_response(200)
            self.end_headers()
            self._trickle(PNG)
        elif path == "/trickle-headers":  # never gets past the headers
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")
            self._trickle(b"X-Slow: " + b"a" * 1000)
        elif path == "/loop":
            self._send(302, Location="/loop")
        elif path.startswith("/chain/"):  # /chain/n redirects n times, then serves the image
            n = int(path.rsplit("/", 1)[1])
            self._send(302, Location=f"/chain/{n - 1}") if n else self._send(200, PNG)
        elif path == "/to-file":
            self._send(302, Location="file:///etc/passwd")
        elif path == "/to-ftp":
            self._send(301, Location="ftp://127.0.0.1/x.png")
        elif path == "/declared-huge":
            self.send_response(200)
            self.send_header("Content-Length", str(fetch.MAX_DOWNLOAD_BYTES + 1))
            self.end_headers()
            self._trickle(b"x" * 10, every=0.01)
        elif path == "/undeclared-huge":  # no length, more than the limit, quickly
            self.protocol_version = "HTTP/1.0"
            self.send_response(200)
            self.end_headers()
            block = b"\0" * (1 << 20)
            try:
                for _ in range((fetch.MAX_DOWNLOAD_BYTES >> 20) + 2):
                    self.wfile.write(block)
            except OSError:
                pass
        else:
            self._send(404, b"no")


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def short_timeout(monkeypatch):
    monkeypatch.setattr(fetch, "DOWNLOAD_TIMEOUT", TIMEOUT)


def describe(*args: str, timeout_s: float | None = None) -> subprocess.CompletedProcess:
    """`pixtral-mlx describe ...` in a subprocess, optionally with a shorter whole-download bound."""
    setup = f"import pixtral_mlx.fetch as m; m.DOWNLOAD_TIMEOUT = {timeout_s}; " if timeout_s else ""
    code = f"import sys; {setup}from pixtral_mlx.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, "describe", *args], capture_output=True, text=True, env=ENV, timeout=120
    )


def one_error_line(run: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in run.stderr, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    return lines[0]


# --- local files: only regular files, and not huge ones -------------------------------------------------


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "photo.png"
    os.mkfifo(path)
    return path


def test_fifo_is_refused_not_opened(fifo, mlx_dir):
    tic = time.monotonic()
    with pytest.raises(ImageError) as e:
        load_image(str(fifo))
    assert str(e.value) == f"{fifo} is a named pipe (FIFO), not an image file."
    with pytest.raises(ImageError, match="named pipe"):
        load_image(f"file://{fifo}")
    run = describe(str(fifo), "--model", str(mlx_dir))
    assert run.returncode == 1 and one_error_line(run) == f"error: {fifo} is a named pipe (FIFO), not an image file."
    assert time.monotonic() - tic < 60  # it used to block forever waiting for a writer


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/null", "/dev/urandom"])
def test_device_is_refused(device, mlx_dir):
    with pytest.raises(ImageError) as e:
        load_image(device)
    assert str(e.value) == f"{device} is a device, not an image file."
    run = describe(device, "--model", str(mlx_dir))
    assert run.returncode == 1 and one_error_line(run) == f"error: {device} is a device, not an image file."


def test_file_over_the_size_cap_is_refused_before_reading(tmp_path, mlx_dir):
    big = tmp_path / "huge.png"
    with open(big, "wb") as f:  # sparse: no disk space used, but stat() says 1 GiB + 1
        f.truncate(images.MAX_FILE_BYTES + 1)
    expected = f"{big} is 1,073,741,825 bytes, over the 1024 MB limit for images."
    tic = time.monotonic()
    with pytest.raises(ImageError) as e:
        load_image(str(big))
    assert str(e.value) == expected and time.monotonic() - tic < 1  # nothing was read
    run = describe(str(big), "--model", str(mlx_dir))
    assert run.returncode == 1 and one_error_line(run) == f"error: {expected}"


def test_regular_files_and_symlinks_to_them_still_load(tmp_path):
    (tmp_path / "a.png").write_bytes(PNG)
    (tmp_path / "link.png").symlink_to(tmp_path / "a.png")
    for src in (tmp_path / "a.png", tmp_path / "link.png", f"file://{tmp_path / 'a.png'}"):
        img, _ = load_image(src)
        assert img.size == (24, 16) and img.mode == "RGB"
    with pytest.raises(ImageError, match="no such file"):
        load_image(str(tmp_path / "missing.png"))


# --- downloads: one deadline for the whole download, http(s) redirects only, a size cap --------------


def test_download_works(server, short_timeout):
    img, name = load_image(f"{server}/ok.png")
    assert img.size == (24, 16) and name == f"{server}/ok.png"
    img, _ = load_image(f"{server}/chain/{fetch.MAX_REDIRECTS}")  # as many redirects as allowed
    assert img.size == (24, 16)


@pytest.mark.parametrize("route", ["/trickle-body", "/trickle-chunked", "/trickle-headers"])
def test_trickling_server_times_out_on_the_whole_download(route, server, short_timeout):
    url = f"{server}{route}"
    tic = time.monotonic()
    with pytest.raises(ImageError) as e:
        load_image(url)
    took = time.monotonic() - tic
    assert str(e.value) == f"could not download {url}: it did not arrive within {TIMEOUT:g} seconds."
    assert TIMEOUT - 0.1 <= took < TIMEOUT + 1.0, took  # each byte comes well within any per-read timeout


def test_trickling_server_through_the_cli(server, mlx_dir):
    url = f"{server}/trickle-body"
    tic = time.monotonic()
    run = describe(url, "--model", str(mlx_dir), timeout_s=2)
    took = time.monotonic() - tic
    assert run.returncode == 1
    assert one_error_line(run) == f"error: could not download {url}: it did not arrive within 2 seconds."
    assert took < 2 + 15, took  # the deadline plus interpreter start-up


@pytest.mark.parametrize(
    "route, reason",
    [
        ("/loop", f"it redirects in a loop or more than {fetch.MAX_REDIRECTS} times."),
        (f"/chain/{fetch.MAX_REDIRECTS + 1}", f"it redirects in a loop or more than {fetch.MAX_REDIRECTS} times."),
        ("/to-file", "it redirects to a file: URL, and only http(s) is followed."),
        ("/to-ftp", "it redirects to a ftp: URL, and only http(s) is followed."),
    ],
)
def test_bad_redirects_are_one_sentence(route, reason, server, mlx_dir):
    url = f"{server}{route}"
    with pytest.raises(ImageError) as e:
        load_image(url)
    assert str(e.value) == f"could not download {url}: {reason}"
    run = describe(url, "--model", str(mlx_dir))
    assert run.returncode == 1 and one_error_line(run) == f"error: could not download {url}: {reason}"


def test_oversize_downloads(server, short_timeout):
    url = f"{server}/declared-huge"
    with pytest.raises(ImageError) as e:
        load_image(url)
    assert str(e.value) == f"{url} is {fetch.MAX_DOWNLOAD_BYTES + 1:,} bytes, over the 50 MB limit."
    url = f"{server}/undeclared-huge"
    with pytest.raises(ImageError) as e:
        load_image(url)
    assert str(e.value) == f"{url} is larger than 50 MB."


def test_http_errors_and_unreachable_hosts_are_one_sentence(server, short_timeout):
    with pytest.raises(ImageError) as e:
        load_image(f"{server}/missing.png")
    assert str(e.value) == f"could not download {server}/missing.png (HTTP 404 Not Found)."
    with pytest.raises(ImageError) as e:
        load_image("http://127.0.0.1:9/x.png")  # the discard port: nothing listens
    assert str(e.value).startswith("could not download http://127.0.0.1:9/x.png (") and "\n" not in str(e.value)


# --- describe --each: every failed image named on stderr; data: URLs shortened in JSON -----------------


def test_each_names_every_failed_image_on_stderr(tmp_path, fifo, mlx_dir):
    good = tmp_path / "good.png"
    good.write_bytes(PNG)
    cut = tmp_path / "cut.png"
    cut.write_bytes(PNG[:60])
    data_url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    args = [str(good), str(tmp_path / "missing.png"), str(fifo), str(cut), data_url]
    run = describe(*args, "--model", str(mlx_dir), "--each", "--max-tokens", "2", "--seed", "0")
    assert run.returncode == 1 and "Traceback" not in run.stderr
    errors = [x for x in run.stderr.splitlines() if x.startswith("error: ")]
    assert errors == [
        f"error: {tmp_path / 'missing.png'}: no such file.",
        f"error: {fifo} is a named pipe (FIFO), not an image file.",
        f"error: {cut} is truncated or corrupt (image file is truncated).",
    ], run.stderr
    lines = [json.loads(x) for x in run.stdout.splitlines()]
    short = images.describe_source(data_url)
    assert [x["image"] for x in lines] == [str(tmp_path / "missing.png"), str(fifo), str(cut), str(good), short]
    assert [("error" in x) for x in lines] == [True, True, True, False, False]
    assert len(short) == 41 and data_url not in run.stdout  # the base64 payload is not echoed back


def test_json_shortens_data_urls(mlx_dir):
    data_url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    run = describe(data_url, "--model", str(mlx_dir), "--json", "--max-tokens", "2", "--seed", "0")
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["images"] == [data_url[:40] + "…"] and data_url not in run.stdout
