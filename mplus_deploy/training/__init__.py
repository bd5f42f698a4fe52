"""Training the M+ parts of a model on a frozen backbone (issue 20): the demo's LoRA adapters, memory positional
embedding, bos embeddings and retriever projectors, with a MemoryLLM-style objective (memorize a context, answer
from memory alone). ``data``: the training facts (never the evaluation facts); ``objective``: one differentiable
memorize-then-answer step on the reference's own forward functions; ``loop``: the seeded training loop and the
parameter file it writes."""
