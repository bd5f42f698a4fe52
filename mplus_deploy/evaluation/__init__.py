"""What an M+ model remembers: the knowledge-retention protocol (``retention.py``) and its data (``facts.py``),
run on a ``runtime.Engine`` by ``mplus-eval retention`` (``cli/eval.py``; docs/evaluation.md)."""
