"""Data: JSONL formats (formats.py), chat rendering and tokenisation (chat.py), tensors and
packing (batching.py), the built-in task (task.py), and prepare scripts for public datasets."""
