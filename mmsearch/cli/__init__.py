"""The `mmsearch` command line, one module per command group.

Each command parses options, calls one library function, renders. Only this package prints. Heavy
modules (torch, open_clip, faiss, web and cluster stacks) are imported inside commands, so
`mmsearch --help` and a text query stay fast; a command's own module is imported when it runs
(`app.COMMAND_MODULES`: a new command is a new entry there, checked by tests/test_cli_commands.py).
"""
from mmsearch.cli.app import cli, load_all, main  # noqa: F401
