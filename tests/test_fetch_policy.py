"""The server's image fetch policy (no SSRF) and per-request pixel budget, against real local HTTP servers.

Every test talks to servers on 127.0.0.x only. A test that must not connect records every `socket.connect`
and fails if one was made; addresses that must never be touched (169.254.169.254, 10.x) are never dialled.
"""

from __future__ import annotations

import io
import ipaddress
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image, ImageFile
from starlette.testclient import TestClient
from test_serve import data_url, png

from pixtral_mlx import fetch, images
from pixtral_mlx.errors import ImageError
from pixtral_mlx.fetch import FetchPolicy, unreachable
from pixtral_mlx.images import PixelBudget, read_source
from pixtral_mlx.server.app import Settings, create_app

SERVER = FetchPolicy.server()
PRIVATE_OK = FetchPolicy.server(allow_private=True)  # still one sentence for every failure


IMG = png(40, 30, 0)
EXPECTED = np.asarray(Image.open(io.BytesIO(IMG)).convert("RGB"))


class Host:
    """A tiny image server on `ip`; `hits` lists (path, Host header) of every request it got."""

    def __init__(self, ip: str = "127.0.0.1"):
        host = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                host.hits.append((self.path, self.headers.get("Host")))
                target = self.path if self.path.startswith("/") else "/" + self.path.split("/", 3)[3]  # as a proxy
                path, _, arg = target.partition("?to=")
                if path == "/img.png":
                    self.reply(200, IMG, "image/png")
                elif path == "/page":
                    self.reply(200, b"<html>internal admin page</html>", "text/html")
                elif path == "/redirect":
                    self.reply(302, b"", "text/plain", Location=arg)
                elif path == "/big":
                    self.reply(200, b"", "image/png", **{"Content-Length": str(1 << 30)})
                elif path == "/slow":
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(IMG)))
                    self.end_headers()
                    time.sleep(2)
                else:
                    self.reply(404, b"nope", "text/plain")

            def reply(self, code: int, body: bytes, kind: str, **headers: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", kind)
                headers.setdefault("Content-Length", str(len(body)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

        self.hits: list[tuple[str, str]] = []
        self.httpd = ThreadingHTTPServer((ip, 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def host():
    h = Host()
    yield h
    h.close()


@pytest.fixture
def other():
    """A second server, on another loopback address (Linux routes all of 127/8 to lo)."""
    h = Host("127.0.0.2")
    yield h
    h.close()


@pytest.fixture
def connects(monkeypatch):
    """Every address a socket connects to from now on (the connections are still made)."""
    made: list = []
    real = socket.socket.connect

    def connect(self, address):
        made.append(address[:2])
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    return made


@pytest.fixture
def no_connect(monkeypatch):
    """Fail any connection attempt (recorded): for addresses that must never be dialled."""
    made: list = []

    def connect(self, address):
        made.append(address[:2])
        raise OSError("this test forbids connecting")

    monkeypatch.setattr(socket.socket, "connect", connect)
    return made


@pytest.fixture
def names(monkeypatch):
    """Fake DNS: `names["x.test"] = [ip, ...]`; each look-up's host is appended to `names.lookups`."""

    class Names(dict):
        lookups: list[str]

    table = Names()
    table.lookups = []
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        table.lookups.append(host)
        if isinstance(host, str) and host.endswith(".test"):
            if host not in table:
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in table[host]]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return table


def public_only(*addresses: str):
    """An address check under which exactly `addresses` count as public (to test hops past a first server)."""
    return lambda ip: str(ip) in addresses


def refused(url: str, policy: FetchPolicy = SERVER, **kwargs) -> str:
    with pytest.raises(ImageError) as e:
        read_source(url, policy=policy, download_timeout=kwargs.pop("timeout", 5), **kwargs)
    return str(e.value)


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"))


# --- addresses ----------------------------------------------------------------------------------------------


LOOPBACK = [
    "127.0.0.1", "localhost", "0.0.0.0", "127.1", "2130706433", "0x7f000001", "0x7f.1", "0177.0.0.1",
    "[::1]", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]",
]  # fmt: skip


@pytest.mark.parametrize("spelling", LOOPBACK)
def test_every_spelling_of_loopback_is_refused_without_connecting(spelling, host, connects, caplog):
    url = f"http://{spelling}:{host.port}/img.png"
    with caplog.at_level(logging.WARNING, logger="pixtral_mlx.fetch"):
        assert refused(url) == unreachable(url)
    assert connects == [] and host.hits == []
    assert "not a public address" in caplog.text  # refused by the check, not by a failed connection


@pytest.mark.parametrize("spelling", [s for s in LOOPBACK if s not in ("[::1]",)])
def test_the_same_spellings_reach_the_image_without_a_policy(spelling, host):
    """What the refusals above protect: each spelling does reach the loopback server (the CLI may fetch it)."""
    img, _ = read_source(f"http://{spelling}:{host.port}/img.png", download_timeout=5)
    assert np.array_equal(pixels(img), EXPECTED)
    assert host.hits[-1][0] == "/img.png"


NOT_PUBLIC = [
    "169.254.169.254", "10.0.0.1", "172.16.5.4", "192.168.1.1", "100.64.0.1", "192.0.2.1", "224.0.0.1",
    "240.0.0.1", "255.255.255.255", "[fe80::1]", "[fc00::1]", "[ff02::1]", "[::]", "[::ffff:169.254.169.254]",
    "[64:ff9b::a00:1]", "[2002:a00:1::1]", "[2001:db8::1]",
]  # fmt: skip


@pytest.mark.parametrize("address", NOT_PUBLIC)
def test_private_link_local_and_metadata_addresses_are_never_dialled(address, no_connect, caplog):
    url = f"http://{address}/latest/meta-data/"
    with caplog.at_level(logging.WARNING, logger="pixtral_mlx.fetch"):
        assert refused(url) == unreachable(url)
    assert no_connect == []
    assert "not a public address" in caplog.text


def test_the_address_check_itself():
    public = ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1"]
    private = [
        "127.0.0.1", "10.1.2.3", "169.254.169.254", "0.0.0.0", "100.64.0.1", "224.0.0.1", "::1", "::",
        "::ffff:10.0.0.1", "64:ff9b::7f00:1", "2002:7f00:1::", "fe80::1", "fd00::1", "ff0e::1", "::7f00:1",
    ]  # fmt: skip
    assert [fetch._public(ipaddress.ip_address(a)) for a in public] == [True] * len(public)
    assert [fetch._public(ipaddress.ip_address(a)) for a in private] == [False] * len(private)


def test_a_name_with_any_non_public_address_is_refused(names, host, connects, caplog):
    names["public.test"] = ["127.0.0.1"]
    names["mixed.test"] = ["8.8.8.8", "127.0.0.1"]  # every address is checked, not just the first
    for name in ("public.test", "mixed.test"):
        url = f"http://{name}:{host.port}/img.png"
        with caplog.at_level(logging.WARNING, logger="pixtral_mlx.fetch"):
            assert refused(url) == unreachable(url)
        assert f"{name} is 127.0.0.1, which is not a public address" in caplog.text
    assert connects == [] and host.hits == []


def test_a_redirect_to_loopback_is_refused_at_that_hop(host, other, connects, monkeypatch, caplog):
    monkeypatch.setattr(fetch, "_public", public_only("127.0.0.1"))  # the first server stands for a public one
    url = f"http://127.0.0.1:{host.port}/redirect?to=http://127.0.0.2:{other.port}/img.png"
    with caplog.at_level(logging.WARNING, logger="pixtral_mlx.fetch"):
        assert refused(url) == unreachable(url)
    assert [path for path, _ in host.hits] == [f"/redirect?to=http://127.0.0.2:{other.port}/img.png"]
    assert other.hits == [] and connects == [("127.0.0.1", host.port)]
    assert "127.0.0.2 is not a public address" in caplog.text


def test_one_look_up_per_hop_and_the_connection_goes_to_the_address_checked(host, names, connects, monkeypatch):
    monkeypatch.setattr(fetch, "_public", public_only("127.0.0.1"))
    names["first.test"] = names["hop.test"] = ["127.0.0.1"]
    url = f"http://first.test:{host.port}/redirect?to=http://hop.test:{host.port}/img.png"
    img, _ = read_source(url, policy=SERVER, download_timeout=5)
    assert np.array_equal(pixels(img), EXPECTED)
    assert names.lookups == ["first.test", "hop.test"]  # no second look-up that could answer differently
    assert connects == [("127.0.0.1", host.port)] * 2
    assert [h for _, h in host.hits] == [f"first.test:{host.port}", f"hop.test:{host.port}"]


def test_no_proxy_from_the_environment_is_used(host, connects, monkeypatch):
    for name in ("no_proxy", "NO_PROXY", "HTTP_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{host.port}")
    monkeypatch.setattr(fetch, "_public", public_only("127.0.0.1"))  # a public proxy: checking it would pass
    url = "http://10.0.0.1/img.png"
    assert refused(url) == unreachable(url)  # the target itself was checked (and never dialled)
    assert connects == [] and host.hits == []
    img, _ = read_source(f"http://example.invalid:{host.port}/img.png", download_timeout=5)  # no policy: proxied
    assert np.array_equal(pixels(img), EXPECTED) and host.hits[0][1] == f"example.invalid:{host.port}"


@pytest.fixture
def tls_host(tmp_path, monkeypatch):
    """An HTTPS image server on 127.0.0.1 whose certificate names only img.pics.test (trusted for the test)."""
    import datetime
    import ssl

    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "img.pics.test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("img.pics.test")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    trusted = ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))
    monkeypatch.setattr(ssl, "_create_default_https_context", lambda *args, **kwargs: trusted)
    h = Host()
    h.httpd.socket = server.wrap_socket(h.httpd.socket, server_side=True)
    yield h
    h.close()


def test_https_to_the_pinned_address_still_checks_the_certificate_name(tls_host, names, connects, caplog):
    names["img.pics.test"] = names["other.pics.test"] = ["127.0.0.1"]
    img, _ = read_source(f"https://img.pics.test:{tls_host.port}/img.png", policy=PRIVATE_OK, download_timeout=5)
    assert np.array_equal(pixels(img), EXPECTED) and connects == [("127.0.0.1", tls_host.port)]
    url = f"https://other.pics.test:{tls_host.port}/img.png"  # the same address, a name the certificate lacks
    with caplog.at_level(logging.WARNING, logger="pixtral_mlx.fetch"):
        assert refused(url, PRIVATE_OK) == unreachable(url)
    assert "certificate is not valid for 'other.pics.test'" in caplog.text
    assert len(tls_host.hits) == 1


# --- one sentence for every failure -------------------------------------------------------------------------------


def test_every_failed_fetch_reads_the_same(host, names, caplog):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    base = f"http://127.0.0.1:{host.port}"
    urls = [
        f"http://127.0.0.1:{closed_port}/img.png",  # nothing listens
        f"{base}/page",  # open, but not an image
        f"{base}/missing",  # HTTP 404
        f"{base}/big",  # over the download limit
        f"{base}/slow",  # too slow
        f"{base}/redirect?to=file:///etc/passwd",  # a redirect off http(s)
        f"{base}/redirect?to=/redirect?to=/redirect?to=/redirect?to=/redirect?to=/redirect?to=/img.png",  # 6 hops
        f"http://nowhere.test:{host.port}/img.png",  # no such name
    ]
    with caplog.at_level(logging.WARNING, logger="pixtral_mlx.fetch"):
        messages = [refused(url, PRIVATE_OK, timeout=0.5).replace(url, "URL") for url in urls]
    assert messages == [unreachable("URL")] * len(urls)
    reasons = [r.getMessage() for r in caplog.records if r.name == "pixtral_mlx.fetch"]
    assert len(reasons) == len(urls) and len(set(reasons)) == len(urls)  # the log keeps each real reason
    assert "Connection refused" in reasons[0] and "not an image" in reasons[1] and "HTTP 404" in reasons[2]
    assert "over the 50 MB limit" in reasons[3] and "file: URL" in reasons[5] and "Name or service" in reasons[7]


def test_a_closed_port_and_an_open_one_are_indistinguishable(host):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    a = refused(f"http://127.0.0.1:{closed_port}/page", PRIVATE_OK)
    b = refused(f"http://127.0.0.1:{host.port}/page", PRIVATE_OK)
    assert a.replace(str(closed_port), "PORT") == b.replace(str(host.port), "PORT")
    assert a == unreachable(f"http://127.0.0.1:{closed_port}/page")


def test_without_uniform_errors_the_reason_is_given(host):
    url = f"http://127.0.0.1:{host.port}/img.png"
    message = refused(url, FetchPolicy(allow_private=False))  # a library user's own policy
    assert message == f"could not download {url}: 127.0.0.1 is not a public address."


# --- opting in and out ----------------------------------------------------------------------------------------------


def test_allow_private_fetches_loopback(host):
    img, _ = read_source(f"http://localhost:{host.port}/img.png", policy=PRIVATE_OK, download_timeout=5)
    assert img.size == (40, 30) and np.array_equal(pixels(img), EXPECTED)


def test_allowed_domains(host, names, no_connect):
    policy = FetchPolicy.server(allow_private=True, allowed_domains=("Example.COM", "*.pics.test"))
    assert policy.allowed_domains == ("example.com", "pics.test")
    allowed = ["example.com", "img.example.com", "EXAMPLE.com.", "a.b.pics.test"]
    assert [policy.allows_host(h) for h in allowed] == [True] * 4
    others = ["notexample.com", "example.com.evil.org", "127.0.0.1", "localhost", "pics.test.evil"]
    assert [policy.allows_host(h) for h in others] == [False] * 5
    for url in (f"http://127.0.0.1:{host.port}/img.png", f"http://notexample.com:{host.port}/img.png"):
        host_name = url.split("//")[1].split(":")[0]
        assert refused(url, policy) == f"{url} is refused: {host_name} is not one of the domains images may come from."
    assert no_connect == [] and host.hits == [] and names.lookups == []  # refused before any look-up


def test_allowed_domains_fetch_and_a_redirect_off_the_list_is_refused(host, other, names):
    names["img.pics.test"] = ["127.0.0.1"]
    names["evil.test"] = ["127.0.0.2"]
    policy = FetchPolicy.server(allow_private=True, allowed_domains=("pics.test",))
    img, _ = read_source(f"http://img.pics.test:{host.port}/img.png", policy=policy, download_timeout=5)
    assert np.array_equal(pixels(img), EXPECTED)
    url = f"http://img.pics.test:{host.port}/redirect?to=http://evil.test:{other.port}/img.png"
    assert refused(url, policy) == unreachable(url)
    assert other.hits == [] and "evil.test" not in names.lookups


def test_no_remote_images(host):
    policy = FetchPolicy.server(remote=False)
    url = f"http://127.0.0.1:{host.port}/img.png"
    assert refused(url, policy) == f"{url} is refused: image URLs are turned off here; send the image as a data: URL."
    assert host.hits == []
    img, _ = read_source(data_url(IMG), policy=policy)
    assert np.array_equal(pixels(img), EXPECTED)


def test_the_cli_default_still_fetches_anything(host):
    img, _ = images.load_image(f"http://127.0.0.1:{host.port}/img.png")
    assert np.array_equal(np.asarray(img), EXPECTED)
    with pytest.raises(ImageError, match="HTTP 404"):  # and keeps its detailed reasons
        images.load_image(f"http://127.0.0.1:{host.port}/missing")


# --- pixels per request, NUL bytes ----------------------------------------------------------------------------------


def test_pixel_budget_refuses_before_decoding():
    budget = PixelBudget(3000)
    read_source(data_url(IMG), pixel_budget=budget)
    read_source(data_url(png(30, 20, 1)), pixel_budget=budget)
    assert budget.used == 1200 + 600
    truncated = png(40, 40, 2)[:100]  # a valid header (40x40), then nothing: decoding it would fail
    with pytest.raises(ImageError) as e:
        read_source(data_url(truncated), pixel_budget=budget)
    assert str(e.value) == (
        "the images of this request add up to 0.1 megapixels with the data: URL image (40x40), "
        "over the limit of 0.003 MP per request; send fewer or smaller images."
    )
    assert budget.used == 1800  # the refused image is not charged
    with pytest.raises(ImageError, match="truncated or corrupt"):  # without the budget it would have been decoded
        read_source(data_url(truncated))


def test_pixel_budget_counts_downloads_and_keeps_its_own_reason(host):
    budget = PixelBudget(2000)
    url = f"http://127.0.0.1:{host.port}/img.png"
    read_source(url, policy=PRIVATE_OK, pixel_budget=budget)
    message = refused(url, PRIVATE_OK, pixel_budget=budget)
    assert message.startswith("the images of this request add up to") and "0.002 MP per request" in message


def test_out_of_memory_while_decoding_is_a_sentence(monkeypatch):
    def load(self):
        raise MemoryError

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    with pytest.raises(ImageError) as e:
        read_source(data_url(IMG))
    assert str(e.value) == "the data: URL image is too large to decode in the memory this machine has free."


@pytest.mark.parametrize("source", ["/tmp/a\0b.png", "file:///tmp/a%00b.png"])
def test_a_nul_byte_in_a_path_is_a_sentence(source):
    with pytest.raises(ImageError) as e:
        read_source(source)
    assert str(e.value) == "/tmp/a\\0b.png is not a valid path: it contains a NUL byte."


# --- through the server's app ------------------------------------------------------------------------------------


def post(settings: Settings, *urls: str):
    content = [{"type": "image_url", "image_url": {"url": u}} for u in urls] + [{"type": "text", "text": "hi"}]
    app = create_app(settings, engine=None)  # the images are refused before the engine is needed
    client = TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False)
    return client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}]})


def test_the_server_refuses_loopback_images_with_the_one_sentence(host, connects):
    assert Settings(model_id="tiny").fetch_policy == SERVER
    url = f"http://localhost:{host.port}/img.png"
    r = post(Settings(model_id="tiny"), url)
    assert r.status_code == 400 and r.json()["error"] == {
        "message": unreachable(url),
        "type": "invalid_request_error",
        "param": "messages.[0].content.[0].image_url",
        "code": "invalid_image",
    }
    assert host.hits == [] and connects == []


def test_the_server_bounds_pixels_per_request():
    r = post(Settings(model_id="tiny", max_request_pixels=2000), data_url(IMG), data_url(IMG))
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "messages.[0].content.[1].image_url"
    assert "over the limit of 0.002 MP per request" in error["message"]


def test_the_server_answers_a_nul_byte_path_with_400(tmp_path):
    r = post(Settings(model_id="tiny", local_dirs=[tmp_path.resolve()]), f"{tmp_path}/a\0b.png")
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "the image path contains a NUL byte, which no file name can hold."


# --- the serve command's flags, end to end --------------------------------------------------------------------


def _ask(url: str, image: str) -> tuple[int, str]:
    import httpx

    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
            {"type": "text", "text": "What is it?"}]}], "max_tokens": 3, "temperature": 0}  # fmt: skip
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    return r.status_code, r.json()["error"]["message"] if r.status_code != 200 else r.json()["choices"][0]["message"]


def test_serve_flags_set_the_policy(mlx_dir, host):
    from test_serve_safety import Command

    image = f"http://127.0.0.1:{host.port}/img.png"
    default = Command(mlx_dir, "--max-request-megapixels", "0.001")
    try:
        assert _ask(default.url, image) == (400, unreachable(image))
        status, message = _ask(default.url, data_url(IMG))  # 40x30 = 1,200 pixels, over 1,000
        assert status == 400 and "over the limit of 0.001 MP per request" in message, message
    finally:
        default.kill()
    assert host.hits == []

    private = Command(mlx_dir, "--allow-private-urls")
    try:
        status, _ = _ask(private.url, image)
        assert status == 200 and host.hits == [("/img.png", f"127.0.0.1:{host.port}")]
    finally:
        private.kill()

    off = Command(mlx_dir, "--allow-private-urls", "--no-remote-images")
    try:
        assert _ask(off.url, image) == (400, f"{image} is refused: image URLs are turned off here; send the image "
                                        "as a data: URL.")  # fmt: skip
        assert _ask(off.url, data_url(IMG))[0] == 200
    finally:
        off.kill()
    assert len(host.hits) == 1
