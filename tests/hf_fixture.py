"""An offline stand-in for the Hugging Face hub files some families fetch: tokenizers (SigLIP, SigLIP 2,
multilingual) and text-tower configs (XLM-R, NLLB), written in the hub's cache layout so that open_clip
and transformers find them with HF_HUB_OFFLINE=1 exactly as they find a real, filled cache.

The tokenizers are small word-level `tokenizers` models over the synthetic captions' words, with the
special tokens of the real ones; the text-tower configs keep the real model type with a shrunk size
(2 layers, width 64) so random weights build in a second. Nothing here is downloaded.
"""
import json
from pathlib import Path

WORDS = ("a an the of and with on in left right above below next to small large big red green blue yellow "
         "purple orange white black gray grey circle square triangle star ring cross photo picture image "
         "dog cat beach people").split()
SNAPSHOT = "0" * 40

# repo -> (special tokens in id order, template for one sequence, tokenizer_config extras)
TOKENIZERS = {
    "timm/ViT-B-16-SigLIP": (["<pad>", "</s>", "<unk>"], "$A </s>", {"model_max_length": 64}),
    "timm/ViT-B-32-SigLIP2-256": (["<pad>", "<eos>", "<bos>", "<unk>"], "$A <eos>", {"model_max_length": 64}),
    "xlm-roberta-base": (["<s>", "<pad>", "</s>", "<unk>"], "<s> $A </s>", {"model_max_length": 512}),
    "facebook/nllb-200-distilled-600M": (["<s>", "<pad>", "</s>", "<unk>"], "eng_Latn $A </s>",
                                         {"model_max_length": 1024}),
}
CONFIGS = {
    "xlm-roberta-base": {"model_type": "xlm-roberta", "architectures": ["XLMRobertaModel"], "hidden_size": 64,
                         "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128,
                         "max_position_embeddings": 80, "type_vocab_size": 1, "pad_token_id": 1,
                         "bos_token_id": 0, "eos_token_id": 2, "layer_norm_eps": 1e-5},
    "facebook/nllb-200-distilled-600M": {"model_type": "m2m_100", "architectures": ["M2M100ForConditionalGeneration"],
                                         "d_model": 64, "encoder_layers": 2, "decoder_layers": 1,
                                         "encoder_attention_heads": 2, "decoder_attention_heads": 2,
                                         "encoder_ffn_dim": 128, "decoder_ffn_dim": 128,
                                         "max_position_embeddings": 96, "pad_token_id": 1, "bos_token_id": 0,
                                         "eos_token_id": 2, "decoder_start_token_id": 2, "scale_embedding": True},
}


def _snapshot(cache: Path, repo: str) -> Path:
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(SNAPSHOT)
    snap = root / "snapshots" / SNAPSHOT
    snap.mkdir(parents=True, exist_ok=True)
    return snap


def _tokenizer_json(specials: list, template: str) -> str:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    extra = [w for w in template.split() if w not in ("$A",) and w not in specials]
    vocab = {t: i for i, t in enumerate(specials + extra + list(dict.fromkeys(WORDS)))}
    unk = next(t for t in specials if "unk" in t)
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(t, vocab[t]) for t in template.split() if t != "$A"])
    return tok.to_str()


def build_hf_cache(cache: Path) -> Path:
    """Write every stand-in into `cache` (a HF_HUB_CACHE folder) and return it."""
    for repo, (specials, template, extra) in TOKENIZERS.items():
        snap = _snapshot(cache, repo)
        (snap / "tokenizer.json").write_text(_tokenizer_json(specials, template))
        names = {"pad_token": "<pad>", "unk_token": "<unk>",
                 "eos_token": next(t for t in specials if t in ("</s>", "<eos>"))}
        if "<s>" in specials:
            names["bos_token"] = "<s>"
        (snap / "tokenizer_config.json").write_text(json.dumps(
            dict(tokenizer_class="PreTrainedTokenizerFast", **names, **extra)))
        if repo.startswith("timm/"):  # the real timm repos hold a timm config.json, which AutoTokenizer reads
            (snap / "config.json").write_text(json.dumps({"architecture": repo.split("/")[1]}))
    for repo, cfg in CONFIGS.items():
        vocab = len(TOKENIZERS[repo][0]) + 1 + len(set(WORDS))
        (_snapshot(cache, repo) / "config.json").write_text(json.dumps(dict(cfg, vocab_size=vocab + 8)))
    return cache
