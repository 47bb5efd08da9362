"""gptstore-lora: LoRA (and DoRA) fine-tuning with peft, as an optimization strategy."""
