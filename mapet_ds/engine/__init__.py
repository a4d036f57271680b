"""Training engine: the DeepSpeed loop shared by pre-training and fine-tuning."""
