"""The `mmsearch` command line, one module per command group.

Each command parses options, calls one library function, renders. Only this package prints. Heavy
modules (torch, open_clip, faiss, web and cluster stacks) are imported inside commands, so
`mmsearch --help` and a text query stay fast. A new command group is a new module here, imported below.
"""
from mmsearch.cli.app import cli, main  # noqa: F401
from mmsearch.cli import (albums_cmds, index_cmds, models_cmds, scale_cmds, search_cmds, serve_cmds,  # noqa: F401,E402
                          shard_cmds, train_cmds, watch_cmds, words_cmds)
