"""gptstore-prune: structured pruning that leaves plain, servable models."""
