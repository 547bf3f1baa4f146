"""Pipeline glue: one thin module per DVC stage over the `textdiff` library, and the CLI."""
