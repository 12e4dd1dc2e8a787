"""Fine-tuning on Ray Train: LoRA, QLoRA or full, with DDP, DeepSpeed ZeRO-2/3 or FSDP2."""
