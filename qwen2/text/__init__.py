"""Text: the byte-level BPE tokenizer, streaming detokenizer, chat templates and tool calls."""
