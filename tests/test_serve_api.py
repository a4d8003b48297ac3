"""`mmsearch serve` through FastAPI's TestClient: every endpoint's JSON, every error, the security rules."""
import io
import os
import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from fastapi.testclient import TestClient  # the dev extra installs the serve extra: a missing one fails, never skips

from mmsearch.indexing.pipeline import index_folders
from mmsearch.search.query import Searcher, parse_query
from mmsearch.serve import create_app
from mmsearch.storage.store import IndexStore
from helpers import build_served_index, exif_rotated_jpeg, untrained_reranker

HIT_KEYS = {"rank", "score", "path", "id", "similarity", "itm", "width", "height", "taken_at", "name", "thumbnail",
            "text_score", "matches",  # where the query's words are in the image (issue 27), else null
            "calibrated", "good", "date", "indexed_at"}
LOCAL = "http://127.0.0.1"


def _png_header(width, height):
    """A PNG that claims width x height pixels (900 MP here) in 50 bytes: the pixel cap must refuse it unread."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def served(tmp_path_factory, synth_dir, tiny_checkpoint):
    """An index of 24 synthetic PNGs, 6 JPEGs in a subfolder, one EXIF-rotated JPEG, and a text corpus."""
    return build_served_index(tmp_path_factory.mktemp("serve"), synth_dir, tiny_checkpoint)


@pytest.fixture(scope="module")
def client(served):
    idx, _ = served
    with TestClient(create_app(idx, warm=False), base_url=LOCAL) as c:
        yield c


def ok(res, status=200):
    assert res.status_code == status, res.text
    return res.json()


def error(res, status):
    """Every error: the status asked for, and one line of JSON with only an 'error' key."""
    assert res.status_code == status, res.text
    assert res.headers["content-type"].startswith("application/json")
    body = res.json()
    assert set(body) == {"error"} and body["error"] and "\n" not in body["error"]
    assert "Traceback" not in res.text
    return body["error"]


def id_of(client, photos, name):
    hits = ok(client.get("/api/search", params={"q": "x", "k": 200}))["hits"]
    return next(h["id"] for h in hits if h["path"] == str(photos / name))


# ---- shapes -----------------------------------------------------------------------------------------
def test_health_and_info(client, served):
    idx, photos = served
    h = ok(client.get("/api/health"))
    assert h["status"] == "ok" and h["images"] == 31 and isinstance(h["generation"], int)
    info = ok(client.get("/api/info"))
    assert info["images"] == 31 and info["texts"] > 0 and info["dim"] == 128
    assert info["roots"] == [str(photos)]
    assert info["folders"] == [str(photos), str(photos / "sub")]
    assert info["rerank_available"] is False and info["max_upload_bytes"] == 20 * 2**20


def test_text_search_matches_the_library(client, served):
    idx, _ = served
    data = ok(client.get("/api/search", params={"q": "a red circle", "k": 5}))
    assert set(data) == {"query", "hits", "more", "reranked", "took_ms", "calibrated", "good_threshold", "no_good_match",
                         "partial", "missing"}
    assert data["calibrated"] is False and data["no_good_match"] is False  # 31 images: too few to calibrate
    assert data["more"] is True and data["reranked"] is False and data["query"]["q"] == "a red circle"
    assert (data["partial"], data["missing"]) == (False, [])  # one index is never partial (sharded: issue 30)
    ref = Searcher(IndexStore.open(idx)).search("a red circle", k=5)
    assert [h["id"] for h in data["hits"]] == [h.id for h in ref]
    assert np.allclose([h["score"] for h in data["hits"]], [h.score for h in ref], atol=1e-5)
    for h in data["hits"]:
        assert set(h) == HIT_KEYS
        assert h["thumbnail"].startswith(f"/api/images/{h['id']}/thumb?size=256&v=")
        assert h["width"] > 0 and h["height"] > 0 and h["itm"] is None and h["calibrated"] is None
        assert h["matches"] is None and h["text_score"] is None  # no image's words say "a red circle"


def test_weighted_terms_match_the_library(client, served):
    idx, _ = served
    q = "2:red circle + blue - square"
    data = ok(client.get("/api/search", params={"q": q, "k": 4}))
    ref = Searcher(IndexStore.open(idx)).search(q, k=4)
    assert [h["id"] for h in data["hits"]] == [h.id for h in ref]


def test_pages_concatenate_to_one_long_list(client):
    full = [h["id"] for h in ok(client.get("/api/search", params={"q": "shapes", "k": 12}))["hits"]]
    pages = []
    for offset in (0, 5, 10):
        page = ok(client.get("/api/search", params={"q": "shapes", "k": 5, "offset": offset}))
        assert [h["rank"] for h in page["hits"]] == list(range(offset + 1, offset + 1 + len(page["hits"])))
        pages += [h["id"] for h in page["hits"]]
    assert pages[:12] == full and len(pages) == 15
    last = ok(client.get("/api/search", params={"q": "shapes", "k": 10, "offset": 25}))
    assert len(last["hits"]) == 6 and last["more"] is False


def test_query_by_id_finds_itself_first_and_equals_the_path_query(client, served):
    idx, photos = served
    target = id_of(client, photos, "sub/" + sorted(os.listdir(photos / "sub"))[0])
    hits = ok(client.get("/api/search", params={"id": target, "k": 3}))["hits"]
    assert hits[0]["id"] == target and hits[0]["score"] > 0.999
    by_path = Searcher(IndexStore.open(idx)).search(images=[hits[0]["path"]], k=3)
    assert [h["id"] for h in hits] == [h.id for h in by_path]
    mixed = ok(client.get("/api/search", params={"id": target, "q": "blue", "k": 3}))
    assert mixed["query"]["id"] == [target] and mixed["query"]["q"] == "blue"


def test_upload_search_finds_the_same_image(client, served):
    _, photos = served
    name = sorted(p for p in os.listdir(photos) if p.endswith(".png"))[3]
    data = ok(client.post("/api/search", params={"k": 2}, files={"image": ("q.png", (photos / name).read_bytes())}))
    assert data["query"]["upload"] is True
    assert data["hits"][0]["path"] == str(photos / name) and data["hits"][0]["score"] > 0.99


def test_heic_upload_is_decoded(client, tmp_path):
    """HEIC needs its file extension to be decoded (media.load_image registers pillow-heif for it)."""
    make = ("import pillow_heif, sys; from PIL import Image; pillow_heif.register_heif_opener(); "
            "Image.new('RGB', (64, 48), (200, 10, 10)).save(sys.argv[1])")  # another process: this one stays unregistered
    subprocess.run([sys.executable, "-c", make, str(tmp_path / "q.heic")], check=True)
    data = ok(client.post("/api/search", params={"k": 1}, files={"image": ("IMG_0001.HEIC", (tmp_path / "q.heic").read_bytes())}))
    assert len(data["hits"]) == 1


def test_filters(client, served):
    _, photos = served
    jpgs = ok(client.get("/api/search", params={"q": "shapes", "k": 50, "ext": "jpg"}))["hits"]
    assert len(jpgs) == 7 and all(h["path"].endswith(".jpg") for h in jpgs)
    sub = ok(client.get("/api/search", params={"q": "shapes", "k": 50, "folder": str(photos / "sub")}))["hits"]
    assert len(sub) == 6 and all(h["path"].startswith(str(photos / "sub") + "/") for h in sub)
    past = ok(client.get("/api/search", params={"q": "shapes", "before": "2000-01-01"}))["hits"]
    assert past == []
    recent = ok(client.get("/api/search", params={"q": "shapes", "k": 50, "after": "2000-01-01"}))["hits"]
    assert len(recent) == 31


def test_image_to_text_by_id_and_upload(client, served):
    idx, photos = served
    name = sorted(os.listdir(photos / "sub"))[0]
    target = id_of(client, photos, "sub/" + name)
    data = ok(client.get(f"/api/images/{target}/texts", params={"k": 3}))
    assert data["corpus"] > 0 and len(data["texts"]) == 3
    assert all(set(t) == {"rank", "score", "text", "id", "similarity", "itm"} for t in data["texts"])
    ref = Searcher(IndexStore.open(idx)).search_texts(images=[str(photos / "sub" / name)], k=3)
    assert [t["id"] for t in data["texts"]] == [t["id"] for t in ref]
    up = ok(client.post("/api/texts", params={"k": 3}, files={"image": ("q.jpg", (photos / "sub" / name).read_bytes())}))
    assert [t["id"] for t in up["texts"]] == [t["id"] for t in ref]


def test_metadata_and_original_file(client, served):
    _, photos = served
    target = id_of(client, photos, "rotated.jpg")
    meta = ok(client.get(f"/api/images/{target}"))
    assert {"id", "path", "name", "folder", "size", "mtime", "taken_at", "width", "height", "ext", "thumbnail",
            "file"} == set(meta)
    assert meta["name"] == "rotated.jpg" and meta["ext"] == ".jpg" and (meta["width"], meta["height"]) == (60, 30)
    res = client.get(meta["file"])
    assert res.status_code == 200 and res.content == (photos / "rotated.jpg").read_bytes()
    assert res.headers["content-type"] == "image/jpeg" and res.headers["x-content-type-options"] == "nosniff"


def test_thumbnail_is_webp_upright_cached_and_remade_when_the_file_changes(client, served):
    idx, photos = served
    target = id_of(client, photos, "rotated.jpg")
    res = client.get(f"/api/images/{target}/thumb", params={"size": 256})
    assert res.status_code == 200 and res.headers["content-type"] == "image/webp"
    thumb = Image.open(io.BytesIO(res.content))
    assert thumb.format == "WEBP" and thumb.size[1] > thumb.size[0]  # EXIF orientation applied: portrait
    cached = list((idx / "thumbs").rglob(f"{target}-256-*.webp"))
    assert len(cached) == 1 and cached[0].read_bytes() == res.content
    assert client.get(f"/api/images/{target}/thumb").content == res.content  # served from the cache
    # the file changes (now blue, no rotation): a new thumbnail replaces the old one
    Image.new("RGB", (60, 30), (20, 20, 220)).save(photos / "rotated.jpg", "JPEG")
    st = os.stat(photos / "rotated.jpg")
    os.utime(photos / "rotated.jpg", ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    new = Image.open(io.BytesIO(client.get(f"/api/images/{target}/thumb").content)).convert("RGB")
    assert new.size[0] > new.size[1] and new.getpixel((5, 5))[2] > 150
    assert len(list((idx / "thumbs").rglob(f"{target}-256-*.webp"))) == 1
    exif_rotated_jpeg(photos / "rotated.jpg")


# ---- errors ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("params,status,message", [
    ({}, 400, "empty query"),
    ({"q": "   "}, 400, "empty query"),
    ({"q": "dog + "}, 400, "empty term"),
    ({"q": "dog", "k": "abc"}, 400, "k:"),
    ({"q": "dog", "k": 0}, 400, "k:"),
    ({"q": "dog", "k": 100000}, 400, "k:"),
    ({"q": "dog", "offset": -1}, 400, "offset:"),
    ({"q": "dog", "ext": "exe"}, 400, "unknown image extension"),
    ({"q": "dog", "after": "yesterday"}, 400, "not a date"),
    ({"q": "dog", "after": "2020-01-02", "before": "2020-01-01"}, 400, "earlier than"),
    ({"q": "dog", "folder": "relative/dir"}, 400, "absolute"),
    ({"q": "dog", "rerank": "maybe"}, 400, "rerank:"),
    ({"q": "dog", "rerank": "true"}, 400, "no re-ranker"),
    ({"id": 999999}, 400, "no image with id 999999"),
    ({"id": -3}, 400, "id:"),
    ({"id": 2**70}, 400, "id:"),
])
def test_bad_search_requests_are_one_line_4xx(client, params, status, message):
    assert message in error(client.get("/api/search", params=params), status)


def test_unknown_ids_and_endpoints(client):
    assert "no image with id 424242" in error(client.get("/api/images/424242"), 404)
    error(client.get("/api/images/424242/thumb"), 404)
    error(client.get("/api/images/424242/file"), 404)
    error(client.get("/api/images/424242/texts"), 404)
    error(client.get("/api/images/abc"), 400)
    error(client.get(f"/api/images/{2**70}"), 400)
    error(client.get("/api/nope"), 404)
    error(client.delete("/api/search"), 405)


def test_bad_uploads(served, client, tmp_path):
    error(client.post("/api/search", files={"image": ("x.png", b"not an image at all")}), 400)
    error(client.post("/api/search", files={"image": ("x.png", b"")}), 400)
    error(client.post("/api/search", data={"other": "1"}), 400)  # no image field
    error(client.post("/api/search", content=b"--zz\r\nbroken", headers={"content-type": "multipart/form-data; boundary=zz"}), 400)
    error(client.post("/api/search", content=b"{}", headers={"content-type": "application/json"}), 400)
    truncated = io.BytesIO()
    Image.new("RGB", (300, 300), (1, 2, 3)).save(truncated, "JPEG")
    error(client.post("/api/search", files={"image": ("t.jpg", truncated.getvalue()[:400])}), 400)
    assert "too large" in error(client.post("/api/search", files={"image": ("b.png", _png_header(30000, 30000))}), 400)


def test_oversized_upload_is_413_before_it_is_read(served):
    idx, photos = served
    with TestClient(create_app(idx, max_upload_bytes=1 << 20, warm=False), base_url=LOCAL) as small:
        big = b"\0" * (2 << 20)
        assert "too large" in error(small.post("/api/search", files={"image": ("big.png", big)}), 413)

        def chunks():  # no Content-Length: counted while reading
            for _ in range(40):
                yield b"\0" * 65536
        error(small.post("/api/search", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"}), 413)
        ok(small.post("/api/search", params={"k": 1}, files={"image": ("ok.png", (photos / "sub").iterdir().__next__().read_bytes())}))


# ---- security ---------------------------------------------------------------------------------------------
def test_other_host_headers_are_refused(client):
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example"):
        assert "not allowed" in error(client.get("/api/health", headers={"host": host}), 400)
    for host in ("127.0.0.1:8000", "localhost", "[::1]:8000"):
        ok(client.get("/api/health", headers={"host": host}))


def test_traversal_attempts_never_reach_the_filesystem(client, served):
    idx, photos = served
    secret = b"catalog"
    for url in ("/static/../catalog.db", "/static/..%2fcatalog.db", "/static/%2e%2e/%2e%2e/catalog.db",
                "/api/images/..%2f..%2fcatalog.db/file", "/api/images/1/../../../catalog.db",
                "/api/images/1%2f..%2f..%2fetc%2fpasswd/file"):
        res = client.get(url)
        assert res.status_code in (400, 404), url
        assert not res.content.startswith(b"SQLite") and secret not in res.content[:20], url
    # a path in the query string is ignored (files are served by id only)
    res = client.get("/api/images/1/file", params={"path": "/etc/passwd"})
    assert b"root:" not in res.content
    # query text that names an existing image is text to the server, never a file to open
    outside = str(photos.parent / "outside.png")
    Image.new("RGB", (32, 32), (9, 9, 9)).save(outside)
    assert parse_query(outside, paths=False)[0].text == outside
    assert parse_query(outside)[0].image == outside  # the CLI still reads it as an image
    hits = ok(client.get("/api/search", params={"q": outside, "k": 1}))["hits"]
    assert hits and hits[0]["score"] < 0.99


def test_files_are_served_only_inside_the_indexed_folders(client, served, tmp_path):
    idx, photos = served
    name = sorted(os.listdir(photos / "sub"))[1]
    target = id_of(client, photos, "sub/" + name)
    original = (photos / "sub" / name).read_bytes()
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"private bytes")
    try:
        (photos / "sub" / name).unlink()
        (photos / "sub" / name).symlink_to(secret)  # swapped for a link that leaves the indexed folder
        assert "outside the indexed folders" in error(client.get(f"/api/images/{target}/file"), 403)
        error(client.get(f"/api/images/{target}/thumb"), 403)
        (photos / "sub" / name).unlink()  # deleted: never served from its old path
        assert "gone" in error(client.get(f"/api/images/{target}/file"), 410)
        error(client.get(f"/api/images/{target}/thumb"), 410)
    finally:
        (photos / "sub" / name).unlink(missing_ok=True)
        (photos / "sub" / name).write_bytes(original)


def test_token_is_required_on_every_api_call(served):
    idx, _ = served
    with TestClient(create_app(idx, token="s3cret", warm=False), base_url=LOCAL, follow_redirects=False) as c:
        for url in ("/api/health", "/api/info", "/api/search?q=dog", "/api/images/1", "/api/images/1/thumb",
                    "/api/images/1/file", "/api/search?q=dog&token=s3cret"):
            assert "token" in error(c.get(url), 401), url
        error(c.post("/api/search", files={"image": ("x.png", b"x")}), 401)
        error(c.get("/api/health", headers={"authorization": "Bearer wrong"}), 401)
        ok(c.get("/api/health", headers={"authorization": "Bearer s3cret"}))
        assert c.get("/").status_code == 200  # the page itself carries no data
        error(c.get("/?token=wrong"), 401)
        login = c.get("/?token=s3cret&q=dog")
        assert login.status_code == 303 and login.headers["location"] == "/?q=dog"
        cookie = login.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        ok(c.get("/api/health"))  # the client kept the cookie


def test_non_loopback_bind_generates_a_token_and_needs_it(served):
    from mmsearch.serve.run import prepare

    idx, _ = served
    launch = prepare(idx, host="0.0.0.0", port=0)
    try:
        assert launch.token and len(launch.token) >= 24 and f"?token={launch.token}" in launch.url
        with TestClient(launch.server.config.app, base_url=LOCAL) as c:
            error(c.get("/api/health"), 401)
            ok(c.get("/api/health", headers={"authorization": f"Bearer {launch.token}"}))
    finally:
        launch.sock.close()
    loop = prepare(idx, host="127.0.0.1", port=0)
    loop.sock.close()
    assert loop.token is None and loop.url.startswith("http://127.0.0.1:")


def test_no_cors_unless_asked(served, client):
    idx, _ = served
    res = client.get("/api/health", headers={"origin": "http://evil.example"})
    assert "access-control-allow-origin" not in res.headers
    with TestClient(create_app(idx, cors_origins=["http://app.example"], warm=False), base_url=LOCAL) as c:
        res = c.get("/api/health", headers={"origin": "http://app.example"})
        assert res.headers["access-control-allow-origin"] == "http://app.example"


def test_page_and_static_files(client):
    res = client.get("/")
    assert res.status_code == 200 and "<title>mmsearch</title>" in res.text
    assert "default-src 'self'" in res.headers["content-security-policy"]
    assert "http" not in res.text.replace('content="width', "")  # no CDN: nothing loaded from elsewhere
    for asset in ("/static/app.js", "/static/app.css"):
        assert client.get(asset).status_code == 200
    assert client.get("/openapi.json").status_code == 200  # the schema; /docs is off (test_serve_security)


# ---- indexing while serving ---------------------------------------------------------------------------------
def test_new_and_deleted_images_are_seen_without_restart(served, tmp_path):
    idx, photos = served
    with TestClient(create_app(idx, warm=False), base_url=LOCAL) as c:
        before = ok(c.get("/api/health"))["images"]
        ok(c.get("/api/search", params={"q": "shapes"}))  # vectors loaded
        extra = photos / "extra.png"
        Image.fromarray(np.full((48, 48, 3), (10, 200, 10), np.uint8)).save(extra)
        index_folders(idx, [photos])
        assert ok(c.get("/api/health"))["images"] == before + 1
        hits = ok(c.get("/api/search", params={"q": "shapes", "k": 100}))["hits"]
        new_id = next(h["id"] for h in hits if h["path"] == str(extra))
        assert c.get(f"/api/images/{new_id}/thumb").status_code == 200
        extra.unlink()
        error(c.get(f"/api/images/{new_id}/file"), 410)  # gone from disk, before any re-index
        index_folders(idx, [photos])
        error(c.get(f"/api/images/{new_id}/file"), 404)
        hits = ok(c.get("/api/search", params={"q": "shapes", "k": 100}))["hits"]
        assert new_id not in {h["id"] for h in hits} and len(hits) == before


# ---- the command line ----------------------------------------------------------------------------------------------
def test_help_imports_no_web_stack():
    code = ("import sys; from mmsearch.cli import main; sys.argv=['mmsearch', 'serve', '--help']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print([m for m in ('fastapi', 'uvicorn', 'starlette', 'torch') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "--token" in out and "--host" in out and out.strip().endswith("[]")


def test_missing_extra_is_one_clear_line(monkeypatch, served):
    from mmsearch.serve import ServeUnavailableError

    monkeypatch.setitem(sys.modules, "fastapi", None)
    with pytest.raises(ServeUnavailableError, match=r"pip install 'mmsearch\[serve\]'"):
        create_app(served[0])


def test_busy_port_is_a_clear_error(served):
    from mmsearch.serve.run import ServeError, prepare

    first = prepare(served[0], port=0)
    try:
        with pytest.raises(ServeError, match="in use"):
            prepare(served[0], port=first.sock.getsockname()[1])
    finally:
        first.sock.close()


# ---- re-ranking through the API -------------------------------------------------------------------------------
def test_rerank_switch_and_stable_pages(served, tmp_path):
    """A re-ranker (random weights: the plumbing is under test, not its quality) is used by default, can be
    switched off, and pages of a re-ranked query concatenate to the same list as one long page."""
    from mmsearch.indexing.backfill import enable_reranker

    idx = tmp_path / "idx"
    shutil.copytree(served[0], idx)
    untrained_reranker(idx, tmp_path / "rr.pt")
    enable_reranker(idx, tmp_path / "rr.pt")
    with TestClient(create_app(idx, warm=False), base_url=LOCAL) as c:
        assert ok(c.get("/api/info"))["rerank_available"] is True
        full = ok(c.get("/api/search", params={"q": "red circle", "k": 12}))
        assert full["reranked"] is True and all(isinstance(h["itm"], float) for h in full["hits"])
        pages = [h["id"] for o in (0, 4, 8) for h in ok(c.get("/api/search", params={"q": "red circle", "k": 4,
                                                                                         "offset": o}))["hits"]]
        assert pages == [h["id"] for h in full["hits"]]
        plain = ok(c.get("/api/search", params={"q": "red circle", "k": 12, "rerank": "false"}))
        assert plain["reranked"] is False and all(h["itm"] is None for h in plain["hits"])
        assert [h["score"] for h in plain["hits"]] == sorted((h["score"] for h in plain["hits"]), reverse=True)


def test_missing_gpu_is_refused_at_start(served):
    from mmsearch.errors import DeviceError
    from mmsearch.serve.run import prepare

    with pytest.raises(DeviceError, match="--device cuda:7"):
        prepare(served[0], port=0, device="cuda:7")
