"""A gptstore plugin to copy and start from."""
