"""The encoder: truncating text to its real length equals open_clip's padded forward; images and texts
come out L2-normalised float32; compact image tokens have the documented shape."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmsearch.config import ModelSpec
from mmsearch.towers.encoder import load_encoder

# mixed lengths in one batch: truncation cuts to the longest, the short ones still see only their own tokens
TEXTS = ["dog", "a red circle left of a blue square", "a photo of a cat sleeping on a sofa in the sun", "x y"]


@pytest.fixture(scope="module", params=["mmsearch-tiny", "ViT-B-32"])
def encoder(request):
    return load_encoder(ModelSpec(model=request.param, pretrained=None))


def test_truncated_text_equals_padded_and_open_clip(encoder):
    truncated = encoder.encode_texts(TEXTS, truncate=True)
    padded = encoder.encode_texts(TEXTS, truncate=False)
    with torch.inference_mode():  # the naive reference: open_clip's own padded encode_text
        ref = F.normalize(encoder.model.encode_text(encoder.tokenize(TEXTS)).float(), dim=-1).numpy()
    assert np.abs(truncated - padded).max() < 1e-5
    assert np.abs(truncated - ref).max() < 1e-5
    # and the cut really happened: the longest text is far shorter than the context
    lengths = (encoder.tokenize(TEXTS) != 0).sum(1)
    assert int(lengths.max()) < encoder.tokenize(TEXTS).shape[1] // 2


def test_single_text_equals_its_row_in_a_batch(encoder):
    alone = encoder.encode_texts(TEXTS[:1])
    batch = encoder.encode_texts(TEXTS)
    assert np.abs(alone[0] - batch[0]).max() < 1e-5


def test_embeddings_are_normalised_float32(encoder):
    txt = encoder.encode_texts(TEXTS)
    pixels = torch.randn(3, 3, encoder.image_size, encoder.image_size, generator=torch.Generator().manual_seed(0))
    img, toks = encoder.encode_image_tensor(pixels, token_grid=2)
    plain = encoder.encode_image_tensor(pixels)
    for m in (txt, img):
        assert m.dtype == np.float32 and np.allclose(np.linalg.norm(m, axis=1), 1.0, atol=1e-5)
    assert img.shape == (3, encoder.dim) and np.abs(img - plain).max() < 1e-5
    assert toks.shape == (3, 1 + 2 * 2, encoder.vision_width)


def test_batched_preprocessing_equals_the_models_transform(encoder):
    """Workers run only the PIL half; ToTensor + Normalize run once per batch. Same pixels as open_clip's."""
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((50, 90), (300, 200))]
    images.append(images[0].convert("L"))  # grey stays 3-channel
    assert encoder.pil_transform is not None
    ref = torch.stack([encoder.preprocess(im.convert("RGB")) for im in images])
    assert torch.allclose(encoder.preprocess_images(images), ref, atol=1e-6)
    assert torch.allclose(encoder.pixels([encoder.pil_transform(im) for im in images]), ref, atol=1e-6)


def test_unavailable_weights_are_one_clear_line(monkeypatch):
    import open_clip

    from mmsearch.errors import WeightsUnavailableError

    with pytest.raises(WeightsUnavailableError) as err:
        load_encoder(ModelSpec(model="ViT-B-32", pretrained="laion2b_typo"))
    msg = str(err.value)
    assert "unknown pretrained tag 'laion2b_typo' for model ViT-B-32" in msg and "laion2b_s34b_b79k" in msg
    assert "--checkpoint FILE" in msg and "\n" not in msg

    def offline(*a, **kw):  # what open_clip raises when the hub cannot be reached
        raise RuntimeError("Failed to download file (open_clip_pytorch_model.bin). Please check your connection")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", offline)
    with pytest.raises(WeightsUnavailableError) as err:
        load_encoder(ModelSpec(model="ViT-B-32", pretrained="laion2b_s34b_b79k"))
    msg = str(err.value)
    assert msg.startswith("cannot download pretrained weights 'laion2b_s34b_b79k' for model ViT-B-32 (no network")
    assert "--pretrained /path/to/weights.bin" in msg and "\n" not in msg
