"""The `mmsearch` click group and the wrapper that turns the library's typed errors into one-line messages."""
from __future__ import annotations

import importlib

import click

from mmsearch.errors import MmsearchError


# Which module defines each command: a process imports only the one it runs (a text query skips the
# other nine modules and what they import, ~15 ms of a 0.3 s query); `load_all` imports them all.
COMMAND_MODULES = {
    "albums": "albums_cmds", "demo": "train_cmds", "dupes": "scale_cmds", "errors": "index_cmds",
    "eval": "train_cmds", "export": "scale_cmds", "import": "scale_cmds", "index": "index_cmds",
    "info": "index_cmds", "models": "models_cmds", "reindex": "index_cmds", "rerank": "index_cmds",
    "search": "search_cmds", "serve": "serve_cmds", "shard": "shard_cmds", "synth": "train_cmds",
    "text": "words_cmds", "texts": "search_cmds", "train": "train_cmds", "train-reranker": "train_cmds",
    "watch": "watch_cmds",
}


class _Group(click.Group):
    """Loads a command's module when the command is asked for; turns the library's typed errors into
    one-line messages and a non-zero exit."""

    def get_command(self, ctx, name):
        if name not in self.commands and name in COMMAND_MODULES:
            importlib.import_module(f"mmsearch.cli.{COMMAND_MODULES[name]}")
        return super().get_command(ctx, name)

    def list_commands(self, ctx):
        return sorted(set(self.commands) | set(COMMAND_MODULES))

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MmsearchError as exc:
            raise click.ClickException(str(exc)) from exc


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mmsearch")
def cli():
    """mmsearch: index image folders, search them by text or image, train and evaluate the models."""


def load_all() -> click.Group:
    """The group with every command loaded (for code that walks `cli.commands`)."""
    for module in sorted(set(COMMAND_MODULES.values())):
        importlib.import_module(f"mmsearch.cli.{module}")
    return cli


def main():
    cli(prog_name="mmsearch")
