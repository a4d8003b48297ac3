"""The pixel cap that decides is mmsearch's (media.DEFAULT_MAX_PIXELS, 200 MP), not PIL's ~89 MP default
(issue 31, item 12): a 108-megapixel phone JPEG indexes, draft-decoded in little memory; a file over the
cap is an error row that says its size and the cap."""
import json
import struct
import subprocess
import sys
import zlib

import pytest
from PIL import Image

from mmsearch.config import ModelSpec
from mmsearch.errors import MediaError
from mmsearch.indexing.pipeline import index_folders
from mmsearch.media import DEFAULT_MAX_PIXELS, load_image
from mmsearch.storage.store import IndexStore

PHONE = (12000, 9000)  # 108 MP, a common phone sensor


def flat_png(path, width, height):
    """A real 1-bit PNG of any size without holding its pixels: rows of zero bits, compressed as a stream."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    with open(path, "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                 + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def big_photos(tmp_path_factory):
    """A folder with the 108 MP JPEG (flat colour at low quality: a ~1.7 MB file) and a 210 MP PNG."""
    folder = tmp_path_factory.mktemp("big-photos")
    Image.new("RGB", PHONE, (150, 90, 40)).save(folder / "phone.jpg", quality=5)
    flat_png(folder / "huge.png", 15000, 14000)
    return folder


def test_phone_jpeg_over_pils_limit_decodes(big_photos, monkeypatch):
    """Item 12: 108 MP is over PIL's own limit (which mmsearch used to enforce) but under mmsearch's cap."""
    assert PHONE[0] * PHONE[1] > Image.MAX_IMAGE_PIXELS  # the case is real: PIL alone refuses it
    img = load_image(big_photos / "phone.jpg", min_size=224)
    assert img.info["original_size"] == PHONE
    assert min(img.size) >= 224 and img.size[0] <= PHONE[0] // 8  # draft: the 1/8 DCT scale
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with Image.open(big_photos / "phone.jpg") as ref:  # the reference: PIL's own 1/8 draft, no limit at all
        ref.draft("RGB", (PHONE[0] // 8, PHONE[1] // 8))
        assert ref.size == img.size
        assert ref.convert("RGB").tobytes() == img.tobytes()
    monkeypatch.undo()
    with pytest.raises(MediaError, match=r"too large \(12000×9000 pixels, cap 100,000,000\)"):
        load_image(big_photos / "phone.jpg", min_size=224, max_pixels=100_000_000)  # a lower cap still decides


def test_pil_limit_restored_after_decoding(big_photos):
    """Item 12: lifting PIL's limit is scoped to mmsearch's own decodes, however many threads overlap
    (indexing decodes on a pool); other PIL users keep theirs afterwards."""
    from concurrent.futures import ThreadPoolExecutor

    before = Image.MAX_IMAGE_PIXELS
    with ThreadPoolExecutor(4) as pool:
        sizes = list(pool.map(lambda _: load_image(big_photos / "phone.jpg", min_size=224).size, range(8)))
    assert len(set(sizes)) == 1
    assert Image.MAX_IMAGE_PIXELS == before and before is not None


def test_phone_jpeg_draft_decode_keeps_memory_low(big_photos):
    """Item 12: the 108 MP JPEG is decoded at draft scale: a fresh process peaks far below the 324 MB of
    its full RGB pixels."""
    code = ("import json, resource, sys\n"
            "from mmsearch.media import load_image\n"
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "img = load_image(sys.argv[1], min_size=224)\n"
            "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "print(json.dumps({'size': img.size, 'grew_mb': (peak - base) / 1024}))\n")
    res = subprocess.run([sys.executable, "-c", code, str(big_photos / "phone.jpg")], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["grew_mb"] < 100, out  # full decode: 324 MB of pixels


def test_index_takes_phone_jpeg_and_refuses_over_cap(big_photos, tiny_checkpoint, tmp_path):
    """Item 12: `index` embeds the 108 MP JPEG; the 210 MP PNG is an error row naming its size and the cap."""
    idx = tmp_path / "idx"
    summary = index_folders(idx, [big_photos], spec=ModelSpec(checkpoint=str(tiny_checkpoint)))
    assert summary.added == 1 and summary.failed == 1
    store = IndexStore.open(idx)
    rows = store.catalog.rows([store.catalog.id_for_path(str(big_photos / "phone.jpg"))])
    (row,) = rows.values()
    assert (row["width"], row["height"]) == PHONE
    (failure,) = store.catalog.failures()
    assert failure["path"] == str(big_photos / "huge.png")
    assert failure["reason"] == f"too large (15000×14000 pixels, cap {DEFAULT_MAX_PIXELS:,})"
