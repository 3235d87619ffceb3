"""Baselines the product is measured against; not part of the product."""
