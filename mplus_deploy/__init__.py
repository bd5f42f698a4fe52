"""mplus-deploy: deploy M+ (memory-augmented Llama with long-term memory) fast."""
__version__ = "0.1.0"
