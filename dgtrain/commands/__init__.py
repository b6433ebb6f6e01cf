"""`dgtrain <subcommand>`: one module per subcommand, each with `main(argv) -> exit code` (see dgtrain/cli.py)."""
