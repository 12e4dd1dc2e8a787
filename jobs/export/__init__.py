"""Export fine-tuned weights as Hugging Face folders the serving slice and vLLM load as they are."""
