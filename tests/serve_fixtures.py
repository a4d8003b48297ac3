"""A small served index for the server tests: synthetic PNGs, JPEGs in a subfolder, an EXIF-rotated JPEG, captions."""
import csv
import os
import shutil

from PIL import Image

from mmsearch.config import ModelSpec
from mmsearch.indexing.corpus import add_texts
from mmsearch.indexing.pipeline import index_folders
from mmsearch.storage.store import IndexStore


def exif_rotated_jpeg(path):
    """A 60x30 landscape JPEG whose EXIF orientation (6 = rotate 90 CW) makes it 30x60 portrait."""
    img = Image.new("RGB", (60, 30), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(path, "JPEG", exif=exif.tobytes())


def build_served_index(root, synth_dir, checkpoint, n_png=24, n_jpg=6, n_texts=80):
    """(index dir, photos dir): n_png PNGs, n_jpg JPEGs under sub/, rotated.jpg, and a caption corpus."""
    photos = root / "photos"
    (photos / "sub").mkdir(parents=True)
    names = sorted(os.listdir(synth_dir / "images"))[:n_png + n_jpg]
    for n in names[:n_png]:
        shutil.copy(synth_dir / "images" / n, photos / n)
    for n in names[n_png:]:
        Image.open(synth_dir / "images" / n).convert("RGB").save(photos / "sub" / (n[:-4] + ".jpg"), quality=95)
    exif_rotated_jpeg(photos / "rotated.jpg")
    idx = root / "idx"
    index_folders(idx, [photos], spec=ModelSpec(model="mmsearch-tiny", pretrained=None, checkpoint=str(checkpoint)))
    with open(synth_dir / "captions.csv") as fh:
        captions = [r["caption"] for r in csv.DictReader(fh)][:n_texts]
    add_texts(IndexStore.open(idx), captions)
    return idx, photos
