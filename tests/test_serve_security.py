"""Issue 31's server items: what an attacker or a careless client did to `mmsearch serve`, each a test that failed
before the fix. TestClient for the rules, a real uvicorn server on loopback where the socket matters."""
import contextlib
import logging
import os
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
import zlib

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from mmsearch.cli import cli
from mmsearch.serve import create_app
from mmsearch.serve.run import prepare
from mmsearch.storage.exchange import export_embeddings
from mmsearch.storage.store import IndexStore
from helpers import build_served_index

LOCAL = "http://127.0.0.1"


@pytest.fixture(scope="module")
def served(tmp_path_factory, synth_dir, tiny_checkpoint):
    return build_served_index(tmp_path_factory.mktemp("security"), synth_dir, tiny_checkpoint, n_png=12, n_jpg=4,
                              n_texts=20)


@pytest.fixture(scope="module")
def client(served):
    with TestClient(create_app(served[0], warm=False), base_url=LOCAL) as c:
        yield c


def error(res, status):
    assert res.status_code == status, res.text
    body = res.json()
    assert set(body) == {"error"} and "\n" not in body["error"]
    return body["error"]


def png_header(width, height):
    """A PNG that claims width x height pixels in ~60 bytes (its pixel data is a stub)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def a_photo(photos):
    return next(p for p in sorted((photos / "sub").iterdir()) if p.suffix == ".jpg")


@contextlib.contextmanager
def running(launch):
    """A prepared `mmsearch serve` (a real uvicorn on its socket) in a thread; yields its URL."""
    thread = threading.Thread(target=launch.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not launch.server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield launch.url
    finally:
        launch.server.should_exit = True
        thread.join(10)


# ---- 1: an imported index serves only files under the roots its user named -------------------------------
def test_imported_index_serves_files_only_under_named_roots(served, tmp_path):
    """Issue 31 item 1: a shard row naming /etc/passwd (or any file) was served, because an index without
    recorded roots fell back to each file's own folder. Now it serves no file until `import --root` names one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    idx, photos = served
    emb = tmp_path / "emb"
    export_embeddings(IndexStore.open(idx), emb)
    secret = tmp_path / "secret.png"  # an image outside every root the user will name
    secret.write_bytes(a_photo(photos).read_bytes())
    (photos / "notes.txt").write_text("not a photo")  # inside the root, but no image
    meta = emb / "metadata" / "metadata_0.parquet"
    table = pq.read_table(meta)
    paths = table.column("image_path").to_pylist()
    paths[:3] = ["/etc/passwd", str(secret), str(photos / "notes.txt")]
    pq.write_table(table.set_column(table.column_names.index("image_path"), "image_path", pa.array(paths)), meta)

    r = CliRunner()
    new = tmp_path / "imported"
    res = r.invoke(cli, ["import", str(emb), "--index", str(new)])
    assert res.exit_code == 0, res.output
    with TestClient(create_app(new, warm=False), base_url=LOCAL) as c:
        hits = c.get("/api/search", params={"q": "red", "k": 50}).json()["hits"]
        assert len(hits) == len(paths)  # search works all the same
        ids = {h["path"]: h["id"] for h in hits}
        for p in ("/etc/passwd", str(secret), paths[5]):
            assert "records no folder" in error(c.get(f"/api/images/{ids[p]}/file"), 403)
            error(c.get(f"/api/images/{ids[p]}/thumb"), 403)
    assert "note: no --root given: `mmsearch serve` finds them but shows no thumbnail or file" in res.output

    res = r.invoke(cli, ["import", str(emb), "--index", str(new), "--root", str(photos)])
    assert res.exit_code == 0, res.output
    assert "note: 2 imported images lie outside the folders the index serves files from" in res.output
    assert IndexStore.open(new).meta["roots"] == [str(photos)]
    with TestClient(create_app(new, warm=False), base_url=LOCAL) as c:
        ok = c.get(f"/api/images/{ids[paths[5]]}/file")
        assert ok.status_code == 200 and ok.content == open(paths[5], "rb").read()
        assert c.get(f"/api/images/{ids[paths[5]]}/thumb").status_code == 200
        assert "outside the indexed folders" in error(c.get(f"/api/images/{ids['/etc/passwd']}/file"), 403)
        assert "outside the indexed folders" in error(c.get(f"/api/images/{ids[str(secret)]}/file"), 403)
        assert "not an image" in error(c.get(f"/api/images/{ids[str(photos / 'notes.txt')]}/file"), 403)
    bad = r.invoke(cli, ["import", str(emb), "--index", str(new), "--root", str(tmp_path / "nope")])
    assert bad.exit_code != 0 and "does not exist" in bad.output


# ---- 2, 3: every response carries the security headers; no CDN docs ---------------------------------------
def test_every_html_response_has_the_csp_and_cannot_be_framed(client, served):
    """Issue 31 item 2: /static/index.html served the page without its CSP and could be framed."""
    _, photos = served
    for url in ("/", "/static/index.html", "/static/app.js", "/api/health", "/api/nope", "/api/images/1/thumb"):
        res = client.get(url)
        h = res.headers
        assert "frame-ancestors 'none'" in h.get("content-security-policy", ""), url
        assert "default-src 'self'" in h["content-security-policy"], url
        assert h.get("x-frame-options") == "DENY" and h.get("x-content-type-options") == "nosniff", url
    page = client.get("/static/index.html")
    assert page.status_code == 200 and "<title>mmsearch</title>" in page.text
    assert len(client.get("/").headers.get_list("content-security-policy")) == 1  # one policy, not two


def test_no_third_party_docs_pages_but_the_schema(client):
    """Issue 31 item 3: /docs and /redoc loaded unpinned CDN scripts into the API's origin; now they are off
    (no installed package ships their assets) and /openapi.json stays."""
    for url in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        assert client.get(url).status_code == 404, url
    schema = client.get("/openapi.json")
    assert schema.status_code == 200 and "/api/search" in schema.json()["paths"]
    assert "openapi.json" in error(client.get("/api/nope"), 404)


# ---- 4: a non-ASCII token is a 401, never a 500 ----------------------------------------------------------
def test_non_ascii_tokens_are_401_without_a_traceback(served, caplog):
    """Issue 31 item 4: a non-ASCII token (header, cookie, ?token=) was a 500 with a traceback per request."""
    idx, _ = served
    with caplog.at_level(logging.WARNING), TestClient(create_app(idx, token="s3cret", warm=False), base_url=LOCAL,
                                                     follow_redirects=False, raise_server_exceptions=False) as c:
        for headers in ({"authorization": "Bearer é".encode()}, {"authorization": b"Bearer \xe9"},
                        {"cookie": "mmsearch_token=é".encode()}, {"cookie": b"mmsearch_token=\xff\xfe"}):
            error(c.get("/api/health", headers=headers), 401)
        error(c.get("/?token=%C3%A9"), 401)
        error(c.get("/?token=\u00e9\u4e2d"), 401)
        error(c.get("/api/health?token=%C3%A9"), 401)
        assert c.get("/api/health", headers={"authorization": "Bearer s3cret"}).status_code == 200
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_login_link_keeps_every_other_parameter(served):
    """The login redirect keeps repeated and non-ASCII parameters byte for byte (it dropped all but one id=)."""
    with TestClient(create_app(served[0], token="s3cret", warm=False), base_url=LOCAL, follow_redirects=False) as c:
        res = c.get("/?token=s3cret&q=caf%C3%A9&id=1&id=2")
        assert res.status_code == 303 and res.headers["location"] == "/?q=caf%C3%A9&id=1&id=2"


def test_a_token_that_cannot_travel_is_refused_at_start(served):
    from mmsearch.serve.run import ServeError

    with pytest.raises(ServeError, match="--token"):
        prepare(served[0], port=0, token="pässwort")
    with pytest.raises(ServeError, match="--token"):
        prepare(served[0], port=0, token="a;b")


# ---- 5: bounded work per request ---------------------------------------------------------------------------
def test_query_terms_and_length_are_capped(client):
    """Issue 31 item 5: 5,000 '+'-joined terms cost ~10 s of CPU and 1.1 GB; now 32 terms and 2,000 characters."""
    MAX_TERMS, MAX_QUERY_CHARS = 32, 2000  # as the README states them (mmsearch.search.query)
    words = [f"w{i}" for i in range(MAX_TERMS + 1)]
    assert "too many query terms" in error(client.get("/api/search", params={"q": " + ".join(words)}), 400)
    assert client.get("/api/search", params={"q": " + ".join(words[:MAX_TERMS]), "k": 1}).status_code == 200
    assert "too long" in error(client.get("/api/search", params={"q": "a" * (MAX_QUERY_CHARS + 1)}), 400)
    ids = "&".join(f"id={i}" for i in range(MAX_TERMS + 1))
    assert "too many query terms" in error(client.get("/api/search?" + ids), 400)
    r = CliRunner().invoke(cli, ["search", " + ".join(words), "--index", str(client.app.state.mm.store.dir)])
    assert r.exit_code != 0 and "too many query terms" in r.output and "Traceback" not in r.output


def test_upload_pixels_are_capped_from_the_header(client, monkeypatch):
    """Issue 31 item 5: an upload over 40 MP is refused from its header, before any pixel is decoded."""
    from PIL import ImageFile

    loads = []
    real = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self.size) or real(self))
    msg = error(client.post("/api/search", files={"image": ("big.png", png_header(8000, 6000))}), 400)  # 48 MP
    assert "too large" in msg and "40,000,000" in msg and loads == []


def test_an_upload_is_decoded_once_and_at_most_two_at_a_time(client, served, monkeypatch):
    """Issue 31 item 5: uploads were decoded twice, outside the embed lock; four at once cost ~2.5 GB."""
    import mmsearch.media as media

    real, lock = media.load_image, threading.Lock()
    calls, active, peak = [], [0], [0]

    def spy(*args, **kwargs):
        with lock:
            calls.append(args[0])
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            time.sleep(0.3)  # long enough for four requests to overlap
            return real(*args, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(media, "load_image", spy)
    data = a_photo(served[1]).read_bytes()
    res = client.post("/api/search", params={"k": 1}, files={"image": ("q.jpg", data)})
    assert res.status_code == 200 and len(calls) == 1, calls
    out = []
    threads = [threading.Thread(target=lambda: out.append(client.post("/api/search", params={"k": 1},
                                                                      files={"image": ("q.jpg", data)})))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status_code for r in out] == [200] * 4 and len(calls) == 5
    assert peak[0] <= 2, peak


def test_other_sites_cannot_use_the_api_even_without_a_token(client, served):
    """Issue 31 item 5: a cross-site page could POST uploads (no preflight) or GET searches and thumbnails of a
    loopback server; now an /api call a browser marks cross-site, or a POST from another Origin, is a 403."""
    data = a_photo(served[1]).read_bytes()
    post = lambda **h: client.post("/api/search", params={"k": 1}, files={"image": ("q.jpg", data)}, headers=h)  # noqa: E731
    assert "other sites" in error(post(origin="http://evil.example"), 403)
    error(post(origin="null"), 403)
    error(post(origin="http://127.0.0.1:9999"), 403)  # another port is another origin
    for site in ("cross-site", "same-site"):
        error(client.get("/api/search", params={"q": "red"}, headers={"sec-fetch-site": site}), 403)
        error(client.get("/api/images/1/thumb", headers={"sec-fetch-site": site}), 403)
    # the page itself (same origin), a typed URL, and scripts (no such headers) are served as before
    assert post(origin=LOCAL, **{"sec-fetch-site": "same-origin"}).status_code == 200
    assert client.get("/api/search", params={"q": "red"}, headers={"sec-fetch-site": "none"}).status_code == 200
    assert client.get("/", headers={"sec-fetch-site": "cross-site"}).status_code == 200  # a link to the page
    with TestClient(create_app(served[0], cors_origins=["http://app.example"], warm=False), base_url=LOCAL) as c:
        res = c.get("/api/health", headers={"origin": "http://app.example", "sec-fetch-site": "cross-site"})
        assert res.status_code == 200 and res.headers["access-control-allow-origin"] == "http://app.example"
        error(c.get("/api/health", headers={"origin": "http://evil.example", "sec-fetch-site": "cross-site"}), 403)


# ---- 6: every loopback address is loopback -------------------------------------------------------------------
def test_serving_on_127_0_0_2_accepts_its_own_url(served, client):
    """Issue 31 item 6: `serve --host 127.0.0.2` printed a URL that its own Host check refused."""
    launch = prepare(served[0], host="127.0.0.2", port=0)
    assert launch.token is None and launch.url.startswith("http://127.0.0.2:")
    with running(launch) as url:
        with urllib.request.urlopen(url + "api/health", timeout=10) as res:
            assert res.status == 200
    for host in ("127.9.8.7:8000", "127.0.0.2", "[::1]:8000", "[0:0:0:0:0:0:0:1]"):
        assert client.get("/api/health", headers={"host": host}).status_code == 200, host
    for host in ("128.0.0.1", "127.0.0.1.evil.example", "10.0.0.1:8000"):
        error(client.get("/api/health", headers={"host": host}), 400)


# ---- 17: an oversized upload sent body-first gets the 413 -----------------------------------------------------
def test_oversized_body_first_upload_gets_the_413_from_a_real_server(served):
    """Issue 31 item 17: an upload over the cap sent body-first (urllib, browsers) got a connection reset, not the
    413: the server answered and closed before reading the body. Now the body is read and dropped first."""
    launch = prepare(served[0], port=0, max_upload_mb=1)
    with running(launch) as url:
        for size in (3 << 20, 12 << 20):
            req = urllib.request.Request(url + "api/search", data=os.urandom(size), method="POST",
                                         headers={"content-type": "multipart/form-data; boundary=x"})
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(req, timeout=30)
            assert info.value.code == 413 and b"too large" in info.value.read()
        # a client that declares an absurd length and sends nothing is answered at once, not waited for
        host, port = launch.sock.getsockname()[:2]
        with socket.create_connection((host, port), timeout=10) as s:
            s.sendall(b"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10000000000\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 413")
        with urllib.request.urlopen(url + "api/health", timeout=10) as res:  # and the server is fine
            assert res.status == 200
