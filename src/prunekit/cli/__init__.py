"""Command-line interface; see prunekit.cli.main."""
