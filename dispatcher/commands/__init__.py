"""The `vbert` subcommands, one module per group of commands; dispatcher/cli.py assembles them."""
