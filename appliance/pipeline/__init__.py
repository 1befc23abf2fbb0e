"""Jobs, routing and the stages a volume goes through (recon, denoise, passthrough)."""
