"""What the benchmarks share: the machine they ran on, their JSON and tables, and their inputs.

A benchmark imports this module and nothing else from benchmarks/ or tests/ (tests/test_benchmarks_common.py
checks it), so each script can be read, run and changed on its own:

- `machine()` / `machine_line()`: the CPU model, its relevant flags, the cores, the load, the versions and
  the ISA switches, for every table (a line) and every JSON (`write_results` adds it under "machine");
- `write_results()`: benchmarks/results/<name>.json (or a given path), written atomically;
- `markdown_table()`;
- inputs: photo-like JPEGs (`make_photos`), the synthetic data set and the demo-configuration checkpoint
  cached under benchmarks/.cache/ (`data_dir`, `train_run`, `demo_checkpoint`), and an offline stand-in
  for the Hugging Face hub files some model families fetch (`build_hf_cache`, also used by the tests).

Nothing heavy is imported here: numpy, PIL, tokenizers and mmsearch are imported by the helper that needs them.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CACHE = HERE / ".cache"

# ---- the machine ---------------------------------------------------------------------------------
# the flags that decide which kernels the towers and training run (AVX-512 and bf16 paths, AMX, VNNI)
FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile", "avx_vnni")
# switches that hold the runtimes to a lower ISA (oneDNN under torch and OpenVINO, ATen's own kernels)
ENV_SWITCHES = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")


def load_average() -> list[float]:
    """The 1, 5 and 15-minute load averages."""
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return [round(v, 2) for v in os.getloadavg()]


def parse_cpuinfo(text: str) -> tuple[str | None, list[str]]:
    """(model name, every flag) of the first processor in /proc/cpuinfo's text ('Features' on ARM)."""
    model, flags = None, None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip().lower()
        if key == "model name" and model is None:
            model = value.strip()
        elif key in ("flags", "features") and flags is None:
            flags = value.split()
    return model, flags or []


def cpu_id(text: str) -> str | None:
    """'family F model M' of the first processor: a VM often names its CPU only 'AMD EPYC', and two
    such hosts (Zen 2 and Zen 3, say) differ in speed more than any change we measure."""
    fields: dict = {}
    for line in text.split("\n\n")[0].splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("cpu family", "model"):
            fields.setdefault(key.strip().lower(), value.strip())
    return f"family {fields['cpu family']} model {fields['model']}" if len(fields) == 2 else None


def machine(cpuinfo: str | None = None) -> dict:
    """What a measurement depends on. `cpuinfo`: /proc/cpuinfo's text (read here when None)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    model, flags = parse_cpuinfo(cpuinfo)
    m = {"cpu": model or platform.processor() or platform.machine() or "unknown",
         "flags": [f for f in FLAGS if f in flags], "arch": platform.machine(), "cpu_count": os.cpu_count(),
         "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
         "load": load_average(), "python": platform.python_version()}
    if cpu_id(cpuinfo):
        m["cpu_id"] = cpu_id(cpuinfo)
    torch = sys.modules.get("torch")  # only when the benchmark imported it: never imported just for this
    if torch is not None and hasattr(torch, "__version__"):
        m["torch"] = str(torch.__version__)
    env = {k: os.environ[k] for k in ENV_SWITCHES if os.environ.get(k)}
    if env:
        m["env"] = env
    return m


def machine_line(m: dict | None = None) -> str:
    """One line for a table: 'machine: CPU (flags); N cores (M usable); load a b c; python X, torch Y'."""
    m = m if m is not None else machine()
    cores = f"{m['cpu_count']} cores" + (f" ({m['usable_cores']} usable)" if m["usable_cores"] != m["cpu_count"] else "")
    name = m["cpu"] + (f" {m['cpu_id']}" if m.get("cpu_id") and not any(c.isdigit() for c in m["cpu"]) else "")
    parts = [f"{name} ({', '.join(m['flags']) or 'no AVX2, AVX-512, AMX or VNNI'})", cores,
             "load " + " ".join(f"{v:.2f}" for v in m["load"]),
             f"python {m['python']}" + (f", torch {m['torch']}" if "torch" in m else "")]
    parts += [f"{k}={v}" for k, v in m.get("env", {}).items()]
    return "machine: " + "; ".join(parts)


# ---- results -------------------------------------------------------------------------------------
def write_json(path: Path, data, **dumps) -> Path:
    """Write `data` as JSON to `path` atomically (a temporary file, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # *.tmp: ignored by git if left behind
    tmp.write_text(json.dumps(data, **{"indent": 2, **dumps}))
    os.replace(tmp, path)
    return path


def write_results(name, result: dict, **dumps) -> Path:
    """benchmarks/results/<name>.json (or `name` itself when it is a path), with `machine()` under
    "machine" unless the result already carries one. `dumps`: json.dumps options (indent 2 by default)."""
    path = Path(name) if isinstance(name, Path) or name.endswith(".json") else RESULTS / f"{name}.json"
    if "machine" not in result:
        result = {**result, "machine": machine()}
    return write_json(path, result, **dumps)


def markdown_table(headers, rows, align: str | None = None) -> str:
    """A Markdown table; `align`: one letter a column, 'l' (---) or 'r' (---:); all 'l' by default."""
    def line(cells):
        return "|" + "|".join(f" {c} " if str(c) != "" else " " for c in cells) + "|"

    sep = {"l": "---", "r": "---:", "c": ":---:"}
    return "\n".join([line(headers), "|" + "|".join(sep[a] for a in (align or "l" * len(headers))) + "|",
                      *(line(r) for r in rows)])


# ---- photo-like JPEGs ----------------------------------------------------------------------------
def make_photos(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> None:
    """Photo-like JPEGs: smooth gradients, shapes and mild noise, so file size and decode cost look real."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    small = (w // 8, h // 8)
    for i in range(n):
        path = folder / f"photo_{i:04d}.jpg"
        if path.exists():
            continue
        yy, xx = np.mgrid[0:small[1], 0:small[0]].astype(np.float32)
        base = np.stack([np.sin(xx / rng.uniform(20, 80) + c) * 60 + rng.uniform(60, 190) +
                         np.cos(yy / rng.uniform(20, 80) + c) * 40 for c in range(3)], -1)
        img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).resize(size, Image.BILINEAR)
        draw = ImageDraw.Draw(img)
        for _ in range(12):
            x0, y0 = rng.integers(0, w), rng.integers(0, h)
            r = int(rng.integers(h // 20, h // 4))
            draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        img = img.filter(ImageFilter.GaussianBlur(2))
        noise = rng.normal(0, 6, (h, w, 3))
        img = Image.fromarray(np.clip(np.asarray(img, np.float32) + noise, 0, 255).astype(np.uint8))
        img.save(path, quality=90)


# ---- the synthetic data set and the demo-configuration checkpoint, cached -------------------------
def demo_config() -> dict:
    """Exactly what `mmsearch demo` synthesises and trains."""
    from mmsearch.demo import DEMO_IMAGES, DEMO_SEED, DEMO_TRAIN

    return dict(n=DEMO_IMAGES, seed=DEMO_SEED, size=64, **DEMO_TRAIN)


def data_dir(cache: Path, n: int, seed: int, size: int) -> Path:
    """Synthetic data for (n, seed, size), generated once; written to a temp folder, then renamed."""
    folder = cache / f"synth-n{n}-seed{seed}-px{size}"
    if not (folder / "captions.csv").exists():
        from mmsearch.datasets.readers import synthesize

        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        synthesize(tmp, n=n, seed=seed, size=size)
        if (folder / "captions.csv").exists():  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
    return folder


def checkpoint_path(cache: Path, cfg: dict) -> Path:
    from mmsearch.config import TINY_MODEL

    return cache / "models" / (f"{TINY_MODEL}-n{cfg['n']}-seed{cfg['seed']}-px{cfg['size']}-"
                               f"s{cfg['steps']}-b{cfg['batch_size']}-lr{cfg['lr']:g}.pt")


def train_run(cache: Path, cfg: dict, log=print) -> dict:
    """Synthesise (cached), train mmsearch-tiny from scratch, time it. Returns the timings and the checkpoint path."""
    from mmsearch.config import TINY_MODEL, ModelSpec
    from mmsearch.train import train_encoder

    t = time.perf_counter()
    data = data_dir(cache, cfg["n"], cfg["seed"], cfg["size"])
    synth_s = time.perf_counter() - t
    ckpt = checkpoint_path(cache, cfg)
    load0 = load_average()[0]
    t, cpu = time.perf_counter(), time.process_time()
    partial = ckpt.with_name(ckpt.name + f".partial{os.getpid()}")  # so an existing ckpt is always finished
    res = train_encoder(data / "captions.csv", ModelSpec(model=TINY_MODEL, pretrained=None), partial,
                        steps=cfg["steps"], batch_size=cfg["batch_size"], lr=cfg["lr"],
                        log=lambda line: log("    " + line))
    wall, cpu = time.perf_counter() - t, time.process_time() - cpu
    os.replace(partial, ckpt)
    return {"data": str(data), "checkpoint": str(ckpt), "synth_or_cache_s": round(synth_s, 2),
            "train_wall_s": round(wall, 2), "train_cpu_s": round(cpu, 2), "train_loop_s": res["train_seconds"],
            "steps_per_s": round(cfg["steps"] / wall, 3), "loop_steps_per_s": round(cfg["steps"] / res["train_seconds"], 3),
            "first_loss": res["first_loss"], "final_loss": res["final_loss"],
            "loadavg_1m": [round(load0, 2), round(load_average()[0], 2)]}


def demo_checkpoint(cache: Path = CACHE, log=print) -> Path:
    """The demo-configuration checkpoint, trained here if not cached yet (train_synth.py keeps it too)."""
    cfg = demo_config()
    ckpt = checkpoint_path(cache, cfg)
    if not ckpt.exists():
        log(f"training the demo configuration -> {ckpt}")
        train_run(cache, cfg, log=log)
    return ckpt


# ---- an offline stand-in for the Hugging Face hub ------------------------------------------------
# Tokenizers (SigLIP, SigLIP 2, multilingual) and text-tower configs (XLM-R, NLLB), written in the hub's
# cache layout so that open_clip and transformers find them with HF_HUB_OFFLINE=1 exactly as they find a
# real, filled cache. The tokenizers are small word-level `tokenizers` models over the synthetic captions'
# words, with the special tokens of the real ones; the text-tower configs keep the real model type with a
# shrunk size (2 layers, width 64) so random weights build in a second. Nothing here is downloaded.
# benchmarks/families.py and the tests (through tests/hf_fixture.py) share this one copy.
HF_WORDS = ("a an the of and with on in left right above below next to small large big red green blue yellow "
            "purple orange white black gray grey circle square triangle star ring cross photo picture image "
            "dog cat beach people").split()
HF_SNAPSHOT = "0" * 40

# repo -> (special tokens in id order, template for one sequence, tokenizer_config extras)
HF_TOKENIZERS = {
    "timm/ViT-B-16-SigLIP": (["<pad>", "</s>", "<unk>"], "$A </s>", {"model_max_length": 64}),
    "timm/ViT-B-32-SigLIP2-256": (["<pad>", "<eos>", "<bos>", "<unk>"], "$A <eos>", {"model_max_length": 64}),
    "xlm-roberta-base": (["<s>", "<pad>", "</s>", "<unk>"], "<s> $A </s>", {"model_max_length": 512}),
    "facebook/nllb-200-distilled-600M": (["<s>", "<pad>", "</s>", "<unk>"], "eng_Latn $A </s>",
                                         {"model_max_length": 1024}),
}
HF_CONFIGS = {
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


def _hf_snapshot(cache: Path, repo: str) -> Path:
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(HF_SNAPSHOT)
    snap = root / "snapshots" / HF_SNAPSHOT
    snap.mkdir(parents=True, exist_ok=True)
    return snap


def _hf_tokenizer_json(specials: list, template: str) -> str:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    extra = [w for w in template.split() if w not in ("$A",) and w not in specials]
    vocab = {t: i for i, t in enumerate(specials + extra + list(dict.fromkeys(HF_WORDS)))}
    unk = next(t for t in specials if "unk" in t)
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(t, vocab[t]) for t in template.split() if t != "$A"])
    return tok.to_str()


def build_hf_cache(cache: Path) -> Path:
    """Write every stand-in into `cache` (a HF_HUB_CACHE folder) and return it."""
    cache = Path(cache)
    for repo, (specials, template, extra) in HF_TOKENIZERS.items():
        snap = _hf_snapshot(cache, repo)
        (snap / "tokenizer.json").write_text(_hf_tokenizer_json(specials, template))
        names = {"pad_token": "<pad>", "unk_token": "<unk>",
                 "eos_token": next(t for t in specials if t in ("</s>", "<eos>"))}
        if "<s>" in specials:
            names["bos_token"] = "<s>"
        (snap / "tokenizer_config.json").write_text(json.dumps(
            dict(tokenizer_class="PreTrainedTokenizerFast", **names, **extra)))
        if repo.startswith("timm/"):  # the real timm repos hold a timm config.json, which AutoTokenizer reads
            (snap / "config.json").write_text(json.dumps({"architecture": repo.split("/")[1]}))
    for repo, cfg in HF_CONFIGS.items():
        vocab = len(HF_TOKENIZERS[repo][0]) + 1 + len(set(HF_WORDS))
        (_hf_snapshot(cache, repo) / "config.json").write_text(json.dumps(dict(cfg, vocab_size=vocab + 8)))
    return cache
