"""The LLM teacher: prompts, instance-wise gated LoRA experts (iLoRA), the gate network and the model."""
