"""What fine-tuning trains on: `datasets` (digits and ImageFolder directories, labelled images) and
`text` (unlabeled text, one example per line, tokenized by the model's own tokenizer)."""
