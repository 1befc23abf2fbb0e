"""CT reconstruction physics: acquisition geometry, projectors (NumPy reference and CUDA) and scan simulation."""
