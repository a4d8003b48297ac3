"""The fusion re-ranker's training step: sharing per-text and per-image work across pairs, cutting the
batch by length and spreading it over thread lanes all give the plain full-batch gradient (the naive
reference: every pair through the model on its own, one BCE mean, one backward)."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from mmsearch.rerank.model import FusionModel
from mmsearch.train.reranker import fusion_backward, pair_logits
from mmsearch.train.lanes import ThreadLanes, length_chunks
from mmsearch.train.precision import Precision

TW, VW, T = 24, 20, 5


def _reference_logits(model: FusionModel, text, lengths, image):
    """The fusion model as first written: nn.MultiheadAttention on every pair, nothing shared."""
    pad = torch.arange(text.shape[1])[None, :] >= lengths[:, None]
    x = model.text_in(text) + model.text_pos[: text.shape[1]]
    img = model.image_in(image) + model.image_pos
    for layer in model.layers:
        h = layer.ln1(x)
        x = x + layer.self_attn(h, h, h, key_padding_mask=pad, need_weights=False)[0]
        x = x + layer.cross_attn(layer.ln2(x), img, img, need_weights=False)[0]
        x = x + layer.mlp(layer.ln3(x))
    x = model.ln_out(x).masked_fill(pad[..., None], 0.0)
    return model.itm(x.sum(1) / lengths[:, None].clamp(min=1)).squeeze(-1)


@pytest.fixture
def setup():
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = FusionModel(TW, VW, T, d=32, layers=2, heads=4)
    n_texts, n_images, n_pairs, L = 30, 25, 90, 11
    lengths = torch.randint(3, L + 1, (n_texts,), generator=gen)
    texts = torch.randn(n_texts, L, TW, generator=gen) * (torch.arange(L)[None, :, None] < lengths[:, None, None])
    f = SimpleNamespace(texts=texts, text_len=lengths, toks=torch.randn(n_images, T, VW, generator=gen))
    text_ids = torch.randint(0, n_texts, (n_pairs,), generator=gen)
    image_ids = torch.randint(0, n_images, (n_pairs,), generator=gen)
    labels = (torch.rand(n_pairs, generator=gen) < 0.25).float()
    return model, f, (text_ids, image_ids, labels)


def _reference_gradients(model, f, batch):
    text_ids, image_ids, labels = batch
    model.zero_grad()
    logits = _reference_logits(model, f.texts[text_ids], f.text_len[text_ids], f.toks[image_ids])
    pos_weight = (labels == 0).sum() / labels.sum()
    loss = F.binary_cross_entropy_with_logits(logits, labels, pos_weight=pos_weight)
    loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in model.parameters()]


def test_shared_work_gives_every_pairs_own_logit(setup):
    model, f, (text_ids, image_ids, _) = setup
    with torch.no_grad():
        ref = _reference_logits(model, f.texts[text_ids], f.text_len[text_ids], f.toks[image_ids])
        shared = pair_logits(model, f, text_ids, image_ids)
    assert torch.unique(text_ids).numel() < len(text_ids)  # there is work to share
    torch.testing.assert_close(shared, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lanes", [1, 2, 3])
def test_lanes_give_the_full_batch_gradient(setup, lanes):
    model, f, batch = setup
    ref_loss, ref_grads = _reference_gradients(model, f, batch)
    params = list(model.parameters())
    fp32 = Precision.create("fp32", torch.device("cpu"))
    with ThreadLanes(lanes) as pool:
        for p in params:
            p.grad = None
        loss = fusion_backward(model, params, f, batch, fp32, pool)
        first = [p.grad.clone() for p in params]
        fusion_backward(model, params, f, batch, fp32, pool)
        again = [p.grad.clone() for p in params]
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for g, r in zip(first, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)
    # summed in lane order, not finishing order: the same batch gives the same bits
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_a_naive_split_would_fail_the_check(setup):
    """Each half's own BCE mean (and its own positive weight) is not the batch's loss: the comparison
    above can tell the difference."""
    model, f, (text_ids, image_ids, labels) = setup
    _, ref_grads = _reference_gradients(model, f, (text_ids, image_ids, labels))
    model.zero_grad()
    for half in torch.tensor_split(torch.arange(len(labels)), 2):
        y = labels[half]
        logits = pair_logits(model, f, text_ids[half], image_ids[half])
        F.binary_cross_entropy_with_logits(logits, y, pos_weight=(y == 0).sum() / y.sum()).backward()
    assert not all(torch.allclose(p.grad, r, atol=1e-5, rtol=1e-4) for p, r in zip(model.parameters(), ref_grads))


def test_length_chunks_cover_every_row_once_and_balance_the_lanes():
    lengths = torch.tensor([9, 17, 10, 13, 9, 15, 17, 10, 12, 16, 9, 11])
    for lanes in (1, 2, 3):
        per_lane = length_chunks(lengths, lanes)
        rows = torch.cat([r for lane in per_lane for r in lane])
        assert sorted(rows.tolist()) == list(range(len(lengths)))
        padded = [sum(len(r) * int(lengths[r].max()) for r in lane) for lane in per_lane]
        assert sum(padded) < len(lengths) * int(lengths.max())  # padding to each chunk's own longest row
        assert max(padded) <= 1.5 * min(padded)
