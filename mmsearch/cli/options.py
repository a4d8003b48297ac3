"""Shared option bundles and helpers of the command line: every command group imports these."""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import click

from mmsearch.config import DEFAULT_MODEL, DEFAULT_PRETRAINED, ModelSpec, default_index_dir, shipped_architectures


class FiniteFloatRange(click.FloatRange):
    """click.FloatRange that also refuses nan and inf: nan compares false to every bound, so a plain
    FloatRange lets `--alpha nan` through."""

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


def number(low=None, high=None, low_open=False) -> FiniteFloatRange:
    """The type of every float option: finite, within [low, high] (or (low, high] with low_open)."""
    return FiniteFloatRange(low, high, min_open=low_open)


def count(low=1, high=None) -> click.IntRange:
    """The type of every int option: within [low, high]."""
    return click.IntRange(low, high)


def index_option(f):
    return click.option("--index", "index_dir", type=click.Path(file_okay=False, path_type=Path),
                        default=None, help="Index folder [default: $MMSEARCH_INDEX or ./indexes/default].")(f)


def model_options(f=None, *, default_model=DEFAULT_MODEL, default_pretrained=DEFAULT_PRETRAINED):
    """--model/--pretrained/--checkpoint; the defaults only document what the command falls back to."""
    def deco(f):
        f = click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
                         help="Weights trained by `mmsearch train` (architecture read from the file).")(f)
        f = click.option("--pretrained", default=None,
                         help=f"open_clip pretrained tag or local weights file; 'none' = random weights "
                              f"[default: {default_pretrained}].")(f)
        return click.option("--model", default=None, help=f"open_clip architecture [default: {default_model}].")(f)
    return deco(f) if f is not None else deco


def device_option(f):
    """--device for every command that runs a torch model; resolved (and refused) by mmsearch.towers.devices."""
    return click.option("--device", default="auto", show_default=True,
                        help="Torch device: auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.")(f)


def output_options(f):
    f = click.option("--paths", "as_paths", is_flag=True, help="Bare paths, one per line (for pipes).")(f)
    f = click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")(f)
    return f


def model_spec(model, pretrained, checkpoint, required=False, warn_random=True):
    """A ModelSpec from CLI options, or None when none were given (reuse the index's model).
    Without --pretrained, an open_clip model gets its default tag and one of ours starts random."""
    if not (model or pretrained or checkpoint):
        return ModelSpec() if required else None
    if checkpoint and pretrained:
        raise click.UsageError("--checkpoint and --pretrained are mutually exclusive")
    model = model or DEFAULT_MODEL
    if pretrained is None and not checkpoint:
        pretrained = None if model in shipped_architectures() else DEFAULT_PRETRAINED
    spec = ModelSpec(model=model, pretrained=None if checkpoint else pretrained, checkpoint=checkpoint)
    if spec.is_random and warn_random:
        click.secho("warning: --pretrained none gives random weights; results are meaningless "
                    "(fine for tests and speed benchmarks)", fg="yellow", err=True)
    return spec


def index_dir_of(index_dir):
    return Path(index_dir) if index_dir else default_index_dir()


class Bar:
    """A tqdm progress callback for the library; silent when stderr is not a terminal."""

    def __init__(self, desc, unit="img"):
        self.desc, self.unit, self.bar, self.stage = desc, unit, None, None

    def __call__(self, done, total=None, stage=None, **info):
        from tqdm import tqdm

        if self.bar is None or (stage and stage != self.stage):
            if self.bar is not None:
                self.bar.close()
            self.stage = stage
            self.bar = tqdm(total=total, desc=stage or self.desc, unit=self.unit, disable=None,
                            dynamic_ncols=True, leave=False)
        if total is not None and self.bar.total != total:
            self.bar.total = total
        self.bar.n = done
        if info:
            self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in info.items()},
                                 refresh=False)
        self.bar.refresh()

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def with_bar(desc, unit="img"):
    """Pass a `progress` callback into the command and close the bar afterwards."""
    def deco(f):
        @functools.wraps(f)
        def wrapper(*a, **kw):
            bar = Bar(desc, unit)
            try:
                return f(*a, progress=bar, **kw)
            finally:
                bar.close()
        return wrapper
    return deco


def yielding_openmp():
    """Indexing runs decode threads next to torch's OpenMP pool; spinning OpenMP workers starve them.
    Measured on 2 busy cores: 1.6x more images/s with passive waiting. Must precede `import torch`;
    a user's own OMP_WAIT_POLICY wins."""
    import os

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def single_blas_thread_for_text(index_dir) -> None:
    """A text query of a causal text tower multiplies a handful of tokens: one BLAS thread is fastest
    (textnp limits it to one anyway). Said before numpy loads, OpenBLAS starts no thread pool at all:
    that start was a third of numpy's import time (0.10 -> 0.07 s CPU, 0.32 -> 0.18 s wall on 2 busy
    cores). Bidirectional towers run their whole context and keep the cores; a user's own setting wins."""
    import os
    import sys

    from mmsearch.towers.exported import peek_meta

    if "numpy" not in sys.modules and peek_meta(index_dir, "text_tower").get("causal", True):
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def emit_json(obj):
    """One line of valid JSON: a file name that is not UTF-8 shows readably, with its exact bytes in
    `path_b64` (mmsearch.storage.fsnames)."""
    from mmsearch.storage.fsnames import json_safe

    click.echo(json.dumps(json_safe(obj), ensure_ascii=False))


def shown(text: str) -> str:
    """A path as the terminal shows it (undecodable bytes as U+FFFD)."""
    from mmsearch.storage.fsnames import display

    return display(text)


def echo_path(path: str) -> None:
    """One path per line for pipes: its exact bytes, so `xargs` finds a file whose name is not UTF-8."""
    from mmsearch.storage.fsnames import is_exact, to_db

    click.echo(path if is_exact(path) else to_db(path))


def render_hits(hits, as_json, as_paths, key, good_only=False):
    """Hits as JSON lines, bare paths or a table; a table gets a `match` column (the calibrated score,
    '*' for a good match) when the index is calibrated. good_only with no good match says so first."""
    if good_only and hits and not any(h.get("good") for h in hits) and hits[0].get("good") is not None:
        click.secho("no good match; closest results below", fg="yellow", err=True)
    if as_json:
        for h in hits:
            emit_json(h)
    elif as_paths:
        for h in hits:
            echo_path(h[key])
    elif not hits:
        click.echo("no results", err=True)
    else:
        from mmsearch.search.moments import clock

        calibrated = hits[0].get("calibrated") is not None  # a `match` column: the calibrated score, * if good
        click.echo(f"{'rank':>4}  {'score':>6}  " + (f"{'match':>6}  " if calibrated else "") + key)
        for h in hits:  # a video's moment: path @ 01:23 (its shot's start), and its other moments after it
            where = ""
            if h.get("start_s") is not None:
                more = [clock(m["start_s"]) for m in h.get("moments", [])[1:]]
                where = f" @ {clock(h['start_s'])}" + (f"  (also {', '.join(more)})" if more else "")
            match = f"{h['calibrated']:>5.1f}{'*' if h.get('good') else ' '}  " if calibrated else ""
            click.echo(f"{h['rank']:>4}  {h['score']:>6.3f}  {match}{shown(h[key])}{where}")
            for m in (h.get("matches") or [])[:3]:  # why a hit matched: its words, the matched ones marked
                click.echo(f"{'':>{22 if calibrated else 14}}{m.get('key') or m['field']}: "
                           f"{marked(m['text'], m['spans'])}")


def marked(text: str, spans) -> str:
    """The text with each matched span in [brackets], cut to about 100 characters around the first."""
    out, last = [], 0
    for s, e in spans:
        out += [text[last:s], "[", text[s:e], "]"]
        last = e
    out.append(text[last:])
    line = "".join(out)
    start = max(0, spans[0][0] - 40) if spans else 0
    return ("…" if start else "") + line[start:start + 100] + ("…" if len(line) > start + 100 else "")


class EchoLog:
    """A logging handler that prints the library's log lines (a watcher's progress) with the time, on stderr."""

    def __init__(self, name: str, level=None):
        import logging

        class Handler(logging.Handler):
            def emit(self, record):
                colour = {logging.WARNING: "yellow", logging.ERROR: "red"}.get(record.levelno)
                click.secho(self.format(record), fg=colour, err=True)

        self.handler = Handler()
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        self.logger = logging.getLogger(name)
        self.logger.addHandler(self.handler)
        self.logger.setLevel(level or logging.INFO)
        self.logger.propagate = False

    def close(self):
        self.logger.removeHandler(self.handler)
