"""Issue 29, the server plays moments: video hits carry their moment, a shot's thumbnail is its frame, and the
original video is served in byte ranges (206) under the same id-only, inside-the-indexed-folders rules as photos;
bad ranges are 416."""
import io
import os

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from mmsearch.serve import create_app
from mmsearch.serve.ranges import RangeError, parse_range
from helpers import build_video_index

LOCAL = "http://127.0.0.1"


@pytest.fixture(scope="module")
def served(tmp_path_factory, synth_dir, tiny_checkpoint):
    return build_video_index(tmp_path_factory.mktemp("serve-video"), synth_dir, tiny_checkpoint)


@pytest.fixture(scope="module")
def client(served):
    with TestClient(create_app(served[0], warm=False), base_url=LOCAL) as c:
        yield c


def ok(res, status=200):
    assert res.status_code == status, res.text
    return res.json() if res.headers["content-type"].startswith("application/json") else res


def error(res, status):
    assert res.status_code == status, res.text
    body = res.json()
    assert set(body) == {"error"} and "\n" not in body["error"]
    return body["error"]


def video_hit(client, info, scene=2):
    hits = ok(client.get("/api/search", params={"q": info["scenes"][scene][2], "k": 5}))["hits"]
    return next(h for h in hits if h.get("kind") == "video"), hits


def test_a_video_hit_carries_its_moment(client, served):
    _, photos, info = served
    hit, hits = video_hit(client, info)
    start, end, _ = info["scenes"][2]
    assert hits[0] is hit or hits[0]["id"] == hit["id"]
    assert start <= hit["frame_s"] < end and hit["path"] == str(photos / "clip.webm")
    assert hit["file"] == f"/api/images/{hit['video_id']}/file" and hit["moments"][0]["id"] == hit["id"]
    assert all(m["thumbnail"].startswith(f"/api/images/{m['id']}/thumb") for m in hit["moments"])
    meta = ok(client.get(f"/api/images/{hit['id']}"))
    assert meta["kind"] == "video" and meta["start_s"] == hit["start_s"] and meta["file"] == hit["file"]
    flat = ok(client.get("/api/search", params={"q": info["scenes"][2][2], "k": 20, "group": "false"}))["hits"]
    assert sum(h.get("kind") == "video" for h in flat) == 3 and ok(client.get("/api/info"))["videos"] == 1


def test_a_shots_thumbnail_is_its_frame(client, served, synth_dir):
    _, _, info = served
    hit, _ = video_hit(client, info)
    res = ok(client.get(hit["thumbnail"]))
    assert res.headers["content-type"] == "image/webp" and "immutable" in res.headers["cache-control"]
    thumb = np.asarray(Image.open(io.BytesIO(res.content)).convert("RGB"), np.float32)
    other, _ = video_hit(client, info, scene=3)
    thumb3 = np.asarray(Image.open(io.BytesIO(ok(client.get(other["thumbnail"])).content)).convert("RGB"), np.float32)
    assert np.abs(thumb - thumb3).mean() > 20  # two scenes, two pictures
    assert ok(client.get(hit["thumbnail"])).content == res.content  # cached


def test_the_video_is_served_in_ranges(client, served):
    _, photos, info = served
    hit, _ = video_hit(client, info)
    data = (photos / "clip.webm").read_bytes()
    full = ok(client.get(hit["file"]))
    assert full.content == data and full.headers["content-type"] == "video/webm"
    assert full.headers["accept-ranges"] == "bytes" and full.headers["x-content-type-options"] == "nosniff"
    for header, (a, b) in {"bytes=0-99": (0, 99), "bytes=100-": (100, len(data) - 1),
                           "bytes=-50": (len(data) - 50, len(data) - 1),
                           "bytes=10-99999999": (10, len(data) - 1)}.items():
        res = client.get(hit["file"], headers={"Range": header})
        assert res.status_code == 206, (header, res.text)
        assert res.content == data[a:b + 1] and res.headers["content-range"] == f"bytes {a}-{b}/{len(data)}"
        assert int(res.headers["content-length"]) == b - a + 1
    for header in ("bytes=5-1", f"bytes={len(data)}-", "bytes=0-1,4-5", "items=0-1", "bytes=-0", "bytes=x-",
                   "bytes=" + "9" * 20 + "-", "bytes=0-" + "1" * 200):
        res = client.get(hit["file"], headers={"Range": header})
        error(res, 416)
        assert res.headers["content-range"] == f"bytes */{len(data)}"


def test_the_range_parser_against_a_naive_reference():
    """Every START-END of a 10-byte file: what slicing a list of bytes gives, or a RangeError."""
    size = 10
    for a in list(range(0, 13)) + [None]:
        for b in list(range(0, 13)) + [None]:
            header = f"bytes={'' if a is None else a}-{'' if b is None else b}"
            if a is None and (b is None or b == 0) or a is not None and (a >= size or b is not None and b < a):
                with pytest.raises(RangeError):
                    parse_range(header, size)
                continue
            got = parse_range(header, size)
            ref = list(range(size))[-b:] if a is None else list(range(size))[a:None if b is None else b + 1]
            assert list(range(got[0], got[1] + 1)) == ref, header
    assert parse_range(None, size) is None


def test_videos_are_refused_like_photos(client, served, tmp_path):
    """Id only; a video swapped for a link leaving the indexed folders is 403; a deleted one 410; an unknown id 404."""
    _, photos, info = served
    hit, _ = video_hit(client, info)
    error(client.get("/api/images/424242/file", headers={"Range": "bytes=0-1"}), 404)
    res = client.get(hit["file"], params={"path": "/etc/passwd"}, headers={"Range": "bytes=0-3"})
    assert res.status_code == 206 and res.content == (photos / "clip.webm").read_bytes()[:4]
    original = (photos / "clip.webm").read_bytes()
    secret = tmp_path / "secret.webm"
    secret.write_bytes(b"private bytes")
    try:
        (photos / "clip.webm").unlink()
        (photos / "clip.webm").symlink_to(secret)
        assert "outside the indexed folders" in error(client.get(hit["file"], headers={"Range": "bytes=0-3"}), 403)
        error(client.get(hit["thumbnail"]), 403)
        (photos / "clip.webm").unlink()
        assert "gone" in error(client.get(hit["file"], headers={"Range": "bytes=0-3"}), 410)
        error(client.get(f"/api/images/{hit['id']}/thumb?size=128"), 410)
    finally:
        (photos / "clip.webm").unlink(missing_ok=True)
        (photos / "clip.webm").write_bytes(original)
        os.utime(photos / "clip.webm")
