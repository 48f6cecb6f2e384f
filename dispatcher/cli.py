"""The `vbert` command: the one place where the subcommands are put together.

The commands live in modules that do not import each other (or this one):
  dispatcher/commands/local.py   info, serve, demo           (the model in this process)
  dispatcher/commands/admin.py   tenant ..., adapter ..., status   (admin API)
  dispatcher/commands/infer.py   classify, tag, embed        (tenant API)
  training/cli.py                train, evaluate, distill, build-table
What the server-calling commands share (options, output, exit codes) is in dispatcher/commands/remote.py
and dispatcher/commands/exit_codes.py. Importing this module imports no torch.
"""
from __future__ import annotations

import click

from dispatcher.commands import admin, infer, local
from dispatcher.commands.exit_codes import EXIT_CODES_EPILOG
from training import cli as training_cli


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES_EPILOG)
def main() -> None:
    """Multi-tenant serving of one shared BERT backbone with per-tenant adapters."""


for _command in (*local.COMMANDS, *admin.COMMANDS, *infer.COMMANDS, *training_cli.COMMANDS):
    main.add_command(_command)


if __name__ == "__main__":
    main()
