"""Test-only helpers: fault injection into training runs (the product has no hooks for it),
running commands, and generated images."""
