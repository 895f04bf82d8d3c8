"""Data preparation for CMed-GPT: raw medical corpora -> tokenizer -> tags -> memmapped bins."""
