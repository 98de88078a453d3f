"""Token reduction: ToMe and EViT. ``ops``: pure tensor functions; ``transform``: config and glue."""
