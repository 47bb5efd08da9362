"""gptstore-hf: model sources for the Hugging Face hub (and its local cache) and GGUF files."""
