"""The CLI's subcommands, one module per area (llmkit/cli.py lists them); each module's `register(sub)`
adds its argparse parsers and sets `handler=` on them."""
