"""One module per `qwen2` subcommand (see qwen2/cli.py)."""
