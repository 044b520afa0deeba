"""The Typer command line: a thin layer that parses, validates and calls the library."""
