"""gptstore-prompt-tuning: prompt tuning with peft, as an optimization strategy."""
