"""One module per ``pacs-xai`` subcommand: argument parsing and printing, no domain logic."""
