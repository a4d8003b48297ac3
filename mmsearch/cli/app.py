"""The `mmsearch` click group and the wrapper that turns the library's typed errors into one-line messages."""
from __future__ import annotations

import click

from mmsearch.errors import MmsearchError


class _Group(click.Group):
    """Turns the library's typed errors into one-line messages and a non-zero exit."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MmsearchError as exc:
            raise click.ClickException(str(exc)) from exc


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mmsearch")
def cli():
    """mmsearch: index image folders, search them by text or image, train and evaluate the models."""


def main():
    cli(prog_name="mmsearch")
