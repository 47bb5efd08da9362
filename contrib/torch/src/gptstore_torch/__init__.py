"""gptstore-torch: the PyTorch eager serving backend."""
