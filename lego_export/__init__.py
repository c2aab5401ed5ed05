"""lego-export: train, export and run LEGO diffusion models brick by brick."""

__version__ = "0.1.0"
