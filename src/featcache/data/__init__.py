"""Manifests, dataset adapters, decoders and synthetic datasets."""
