"""A file deleted or renamed by an indexer while the server sends it (found by benchmarks/soak_serve.py,
issue 31's soak): a 410 if it is gone before it is opened, the whole file if it goes after; never a 500."""
import pytest
from fastapi.testclient import TestClient  # the dev extra installs the serve extra: a missing one fails

from helpers import build_served_index
from mmsearch.serve import create_app
from mmsearch.serve.state import ServeState


@pytest.fixture(scope="module")
def served(tmp_path_factory, synth_dir, tiny_checkpoint):
    return build_served_index(tmp_path_factory.mktemp("race"), synth_dir, tiny_checkpoint, n_png=3, n_jpg=1,
                              n_texts=2)


def _file_id(client, photos, name):
    hits = client.get("/api/search", params={"q": "x", "k": 50}).json()["hits"]
    return next(h["id"] for h in hits if h["path"] == str(photos / name))


def test_file_deleted_after_the_check_is_410_not_500(served, monkeypatch):
    """Soak finding: the path was checked, then the file was deleted before the response opened it."""
    idx, photos = served
    victim = sorted(p.name for p in photos.glob("*.png"))[0]
    real = ServeState.servable_path

    def check_then_delete(self, row):
        path = real(self, row)
        if path.endswith(victim):
            (photos / victim).unlink()  # the indexer's delete, right after the check
        return path

    with TestClient(create_app(idx, warm=False), base_url="http://127.0.0.1", raise_server_exceptions=False) as c:
        target = _file_id(c, photos, victim)
        monkeypatch.setattr(ServeState, "servable_path", check_then_delete)
        res = c.get(f"/api/images/{target}/file")
        assert res.status_code == 410, res.text
        assert "gone from disk" in res.json()["error"]


def test_file_opened_then_deleted_is_sent_whole(served):
    """An open file outlives its unlink: the response streams all of it, with its length and type."""
    idx, photos = served
    name = sorted(p.name for p in photos.glob("*.png"))[-1]
    data = (photos / name).read_bytes()
    with TestClient(create_app(idx, warm=False), base_url="http://127.0.0.1") as c:
        target = _file_id(c, photos, name)
        with c.stream("GET", f"/api/images/{target}/file") as res:
            (photos / name).unlink()
            body = res.read()
        assert res.status_code == 200 and body == data
        assert res.headers["content-type"] == "image/png" and res.headers["content-length"] == str(len(data))
        assert res.headers["x-content-type-options"] == "nosniff"
