"""Reconstruction algorithms, written once against the `Operator` interface."""
