"""PyTorch training stack for LEGO models: data, EDM joint loss, training loop, lego-train."""
