"""The `imgclf` command and its subcommands."""
