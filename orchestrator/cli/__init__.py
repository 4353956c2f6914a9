"""The ``sweep`` command line (Typer): thin commands that parse, call a service, render."""
