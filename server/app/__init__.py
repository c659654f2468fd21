"""The `sl-serve` process: settings, lifecycle and the command-line tools."""
