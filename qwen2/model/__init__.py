"""The model's math: decoder layers, attention variants, rotary embeddings, configs.
Knows nothing about files, HTTP, sampling or training loops."""
