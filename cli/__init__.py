"""mamba-cli's command line: thin typer modules that parse, call the runtime and render with rich."""
