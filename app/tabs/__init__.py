"""One module per tab; each exposes ``build(ctx, ...)`` that creates its widgets inside the open gr.Blocks."""
