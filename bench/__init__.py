"""Benchmarks: code, not tests. Results go to bench/results/ as JSON with the machine recorded."""
