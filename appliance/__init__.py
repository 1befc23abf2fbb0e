"""Scanner-side inference appliance for CT and MR."""

__version__ = "0.1.0"
