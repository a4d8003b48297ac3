"""Shared option bundles and helpers of the command line: every command group imports these."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import click

from mmsearch.config import DEFAULT_MODEL, DEFAULT_PRETRAINED, ModelSpec, default_index_dir, shipped_architectures


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


def render_hits(hits, as_json, as_paths, key):
    if as_json:
        for h in hits:
            emit_json(h)
    elif as_paths:
        for h in hits:
            echo_path(h[key])
    elif not hits:
        click.echo("no results", err=True)
    else:
        click.echo(f"{'rank':>4}  {'score':>6}  {key}")
        for h in hits:
            click.echo(f"{h['rank']:>4}  {h['score']:>6.3f}  {shown(h[key])}")

