"""Offline with hub files missing is one line at once (issue 31, item 18): the Hugging Face cache is
checked first, then one short probe with no retries, and huggingface_hub's warnings never reach stderr.
Before, a SigLIP or XLM-R model without its tokenizer cached spent ~46 s in hub retries and printed
44 warning lines before the error."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from helpers import build_hf_cache

# the child: heavy imports first (not what is timed), then each case's CLI run with fd 2 sent to a file,
# so log handlers bound to the original stderr are caught too
CHILD = textwrap.dedent("""
    import json, os, sys, time
    import open_clip, torch  # noqa: F401
    from mmsearch.cli import cli
    cases, out = json.loads(sys.argv[1]), {}
    for name, args in cases.items():
        path = sys.argv[2] + "." + name
        sys.stderr.flush()
        saved, fd = os.dup(2), os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 2)
        started = time.perf_counter()
        try:
            cli.main(args, prog_name="mmsearch")
            code = 0
        except SystemExit as exc:
            code = exc.code
        seconds = time.perf_counter() - started
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(fd)
        out[name] = {"code": code, "seconds": seconds, "stderr": open(path).read()}
    print(json.dumps(out))
""")


def start_offline(tmp_path, cache, cases, tag="a"):
    """Start `cases` ({name: mmsearch args}) in a fresh process whose hub is unreachable: HF_ENDPOINT is a
    closed local port (this machine has no network either), HF_HUB_OFFLINE is not set. The returned
    function waits for it and gives its results: two children import torch and open_clip side by side."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_HUB_CACHE=str(cache), HF_ENDPOINT="http://127.0.0.1:9", MMSEARCH_CACHE_DIR="off",
               PYTHONPATH=os.getcwd())
    proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(cases), str(tmp_path / f"stderr-{tag}")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=os.getcwd())

    def wait():
        try:
            out, err = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        assert proc.returncode == 0, err[-3000:]
        return json.loads(out.strip().splitlines()[-1])
    return wait


def index_args(tmp_path, model, pretrained):
    folder = tmp_path / "photos"
    folder.mkdir(exist_ok=True)
    return ["index", str(folder), "--index", str(tmp_path / f"idx-{model}"), "--model", model,
            "--pretrained", pretrained]


@pytest.mark.timeout(900)
def test_missing_hub_files_offline_fail_in_seconds_with_one_line(tmp_path):
    """Item 18: tokenizer not cached (SigLIP, XLM-R), and weights not cached though the tokenizer is:
    each a one-line error in < 5 s, and that line is all of stderr."""
    empty = tmp_path / "empty-cache"
    empty.mkdir()
    filled = build_hf_cache(tmp_path / "hf-cache")  # tokenizers and text configs, no weights
    first = start_offline(tmp_path, empty, {
        "siglip": index_args(tmp_path, "ViT-B-16-SigLIP", "webli"),
        "xlmr": index_args(tmp_path, "xlm-roberta-base-ViT-B-32", "laion5b_s13b_b90k"),
    })
    (tmp_path / "b").mkdir()  # the second child's own index folder: two writers of one would be refused
    second = start_offline(tmp_path, filled, {"weights": index_args(tmp_path / "b", "ViT-B-16-SigLIP", "webli")}, "b")
    got = {**first(), **second()}
    expect = {"siglip": "its tokenizer 'timm/ViT-B-16-SigLIP' is not in the Hugging Face cache",
              "xlmr": "its tokenizer 'xlm-roberta-base' is not in the Hugging Face cache",
              "weights": "cannot download pretrained weights 'webli' for model ViT-B-16-SigLIP (no network"}
    for name, words in expect.items():
        r = got[name]
        lines = r["stderr"].strip().splitlines()
        assert r["code"] == 1, (name, r)
        assert len(lines) == 1, (name, r["stderr"][:2000])
        assert lines[0].startswith("Error: ") and words in lines[0], (name, lines[0])
        assert r["seconds"] < 5, (name, r["seconds"])
    assert not any((d / f"idx-{m}").exists() for m in ("ViT-B-16-SigLIP", "xlm-roberta-base-ViT-B-32")
                   for d in (tmp_path, tmp_path / "b"))


def test_cached_hub_files_build_without_touching_the_network(tmp_path, monkeypatch):
    """Item 18: with everything cached, the build runs under huggingface_hub's offline switch (nothing is
    requested, so nothing retries), and the switch is put back afterwards."""
    import huggingface_hub.constants as hc

    from mmsearch.towers import hub

    cache = build_hf_cache(tmp_path / "hf-cache")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "hub_reachable", lambda *a, **k: pytest.fail("probed though all was cached"))
    import open_clip

    cfg = open_clip.get_model_config("ViT-B-16-SigLIP")
    with hub.hub_access("ViT-B-16-SigLIP", cfg, None):
        assert hc.HF_HUB_OFFLINE is True
        tok = hub.build_tokenizer("ViT-B-16-SigLIP", cfg)
    assert hc.HF_HUB_OFFLINE is False
    assert tok(["a red circle"]).shape[0] == 1
