"""Images with known words, rendered with Debian's fonts (fonts-dejavu-core, fonts-noto-cjk; .ci/run installs
them). A test that needs a font skips only off CI when the font is missing: on CI a missing font fails."""
import os

import pytest
from PIL import Image, ImageDraw, ImageFont

DEJAVU = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
NOTO_CJK = "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc"
INSTALL = "apt-get install -y fonts-dejavu-core fonts-noto-cjk"


def need_font(path: str) -> str:
    if os.path.exists(path):
        return path
    if os.environ.get("CI"):
        pytest.fail(f"font {path} missing on CI (.ci/run installs it: {INSTALL})")
    pytest.skip(f"font {path} missing: {INSTALL}")


def need_ocr():
    from mmsearch.indexing.ocr import ocr_available

    if not ocr_available():
        if os.environ.get("CI"):
            pytest.fail("rapidocr missing on CI (pip install -e '.[dev]' installs it)")
        pytest.skip("rapidocr missing: pip install 'mmsearch[ocr]'")


def render(path, lines, size=(480, 200), font_size=30, font=DEJAVU, bg=(245, 245, 240), fg=(20, 20, 20),
           exif=None, fmt=None):
    """Black text lines on a light background, saved to `path` (EXIF: a PIL Image.Exif)."""
    img = Image.new("RGB", size, bg)
    draw = ImageDraw.Draw(img)
    f = ImageFont.truetype(need_font(font), font_size)
    for i, line in enumerate(lines):
        draw.text((24, 24 + int(font_size * 1.6) * i), line, fill=fg, font=f)
    kw = {"exif": exif.tobytes()} if exif is not None else {}
    img.save(path, fmt, **kw)
    return path
