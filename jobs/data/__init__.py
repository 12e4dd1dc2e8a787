"""Training data: readers (OpenAI messages, alpaca, HF datasets), chat-template tokenisation with
assistant-only labels, packing, and the identity-dataset generator."""
