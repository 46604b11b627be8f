"""The app's refusals, with real requests to a real server on a real port: a DNS-rebinding-shaped request (foreign
``Host``), a state-changing request from another page (foreign ``Origin``), a body over the limit sent in chunks
(no ``Content-Length``), a missing or wrong token; and the token's way from the printed address into a cookie."""

import contextlib
import json
import socket

import pytest

from samadapt.serve import create_app
from samadapt.serve.app import MAX_BODY
from tests.serve.conftest import running

TOKEN = "guard-test-token"


@pytest.fixture
def served(workspace):
    with running(create_app(workspace, token=TOKEN, hosts=["samadapt.lan"])) as port:
        yield port


def http(port: int, method: str, path: str, headers: dict | None = None, body: bytes | list[bytes] = b"") -> tuple:
    """One raw HTTP/1.1 request -> (status, headers, body). A list body is sent chunked, with no Content-Length."""
    headers = {"Host": f"127.0.0.1:{port}", "Connection": "close", **(headers or {})}
    if isinstance(body, list):
        headers["Transfer-Encoding"] = "chunked"
        payload = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in body) + b"0\r\n\r\n"
    else:
        headers.setdefault("Content-Length", str(len(body)))
        payload = body
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as connection:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # it answered before reading all
            connection.sendall(head.encode() + payload)
        try:
            while chunk := connection.recv(1 << 16):
                answer += chunk
        except ConnectionResetError:
            if b"\r\n\r\n" not in answer:  # a server that closed on unread bytes, after its answer
                raise
    top, _, content = answer.partition(b"\r\n\r\n")
    lines = top.decode().split("\r\n")
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        fields.setdefault(name.strip().lower(), []).append(value.strip())
    return int(lines[0].split()[1]), fields, content


def open_body(root) -> bytes:
    return json.dumps({"path": str(root / "scans" / "disc.nii.gz")}).encode()


JSON = {"Content-Type": "application/json", "X-Token": TOKEN}


def test_a_rebinding_request_is_refused_whatever_it_asks(served):
    for host in ("evil.example.com", f"evil.example.com:{served}", "127.0.0.1.evil.example.com", "localhost.evil"):
        for path in ("/api/info", "/", "/static/app.js"):
            status, _, content = http(served, "GET", path, {"Host": host, "X-Token": TOKEN})
            assert status == 403, (host, path)
            assert b"disc.nii.gz" not in content and b"is not served here" in content
    status, _, content = http(served, "GET", "/api/info", {"X-Token": TOKEN, "Host": ""})
    assert status in (400, 403) and b"disc.nii.gz" not in content  # an empty Host: refused by uvicorn or the app


@pytest.mark.parametrize(
    "host", ["127.0.0.1:{port}", "localhost:{port}", "[::1]:{port}", "LOCALHOST", "samadapt.lan:80"]
)
def test_the_loopback_names_and_the_given_host_are_served(served, host):
    status, _, content = http(served, "GET", "/api/info", {"Host": host.format(port=served), "X-Token": TOKEN})
    assert status == 200 and b"disc.nii.gz" in content


def test_a_foreign_origin_may_not_change_anything(served, workspace, root):
    same = f"http://127.0.0.1:{served}"
    for origin in ("http://evil.example.com", "null", f"http://localhost:{served}", "http://127.0.0.1:1", "https:"):
        status, _, content = http(served, "POST", "/api/open", {**JSON, "Origin": origin}, open_body(root))
        assert status == 403 and b"from another page" in content, origin
    form = {"Content-Type": "application/x-www-form-urlencoded", "Origin": "http://evil.example.com"}
    assert http(served, "POST", f"/api/open?token={TOKEN}", form, b"path=%2Fetc%2Fpasswd")[0] == 403
    assert workspace.sessions == {}  # nothing was opened
    # a read from another page stays a read (the browser keeps its answer from that page, having no CORS header)
    status, fields, _ = http(served, "GET", "/api/info", {"X-Token": TOKEN, "Origin": "http://evil.example.com"})
    assert status == 200 and "access-control-allow-origin" not in fields
    status, _, content = http(served, "POST", "/api/open", {**JSON, "Origin": same}, open_body(root))
    assert status == 200 and json.loads(content)["shape"] == [6, 48, 64]
    assert http(served, "POST", "/api/open", JSON, open_body(root))[0] == 200  # no Origin: not a browser's page


def test_a_chunked_body_over_the_limit_is_refused(served, workspace, root):
    # valid JSON made large by whitespace: read to its end, it would open the case
    padded = open_body(root)[:-1] + b" " * (MAX_BODY + 1) + b"}"
    chunks = [padded[i : i + 65536] for i in range(0, len(padded), 65536)]
    status, _, content = http(served, "POST", "/api/open", JSON, chunks)
    assert status == 413 and f"larger than {MAX_BODY} bytes".encode() in content
    assert workspace.sessions == {}
    length = {**JSON, "Content-Length": str(len(padded))}
    assert http(served, "POST", "/api/open", length)[0] == 413  # a length over the limit: refused before reading
    small = open_body(root)
    status, _, content = http(served, "POST", "/api/open", JSON, [small[:10], small[10:]])  # chunked, small: served
    assert status == 200 and json.loads(content)["shape"] == [6, 48, 64]
    assert http(served, "POST", "/api/open", {**JSON, "Content-Length": "12x"}, b"")[0] in (400, 413)


def test_the_token_is_required_and_moves_from_the_address_into_a_cookie(served):
    assert http(served, "GET", "/api/info")[0] == 403
    status, _, content = http(served, "GET", "/api/info", {"X-Token": "guard-test-tokeN"})
    assert status == 403 and b"open the address that samadapt serve printed" in content
    assert http(served, "GET", "/api/info?token=wrong")[0] == 403
    assert http(served, "GET", "/api/info", {"X-Token": TOKEN})[0] == 200
    assert http(served, "GET", f"/api/info?token={TOKEN}")[0] == 200
    assert http(served, "GET", "/")[0] == 200  # the page itself holds no data
    assert http(served, "GET", "/?token=wrong")[0] == 200  # a wrong token sets nothing
    status, fields, _ = http(served, "GET", f"/?token={TOKEN}")  # the printed address
    assert status == 303 and fields["location"] == ["/"]
    cookie = fields["set-cookie"][0]
    name = f"samadapt-token-{served}"
    assert cookie.startswith(f"{name}={TOKEN};") and "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert http(served, "GET", "/api/info", {"Cookie": f"{name}={TOKEN}"})[0] == 200
    assert http(served, "GET", "/api/info", {"Cookie": f"samadapt-token-1={TOKEN}"})[0] == 403  # another port's
    assert http(served, "GET", "/api/info", {"Cookie": f"{name}=wrong"})[0] == 403
