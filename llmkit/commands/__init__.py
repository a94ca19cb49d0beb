"""CLI subcommands beyond the core ones in llmkit/cli.py, one module per area; each module's
`register(sub)` adds its argparse parsers and sets `handler=` on them."""
