"""`train`: train a Qwen-Image-Edit LoRA from the cache that `prep` built (never from raw images)."""
