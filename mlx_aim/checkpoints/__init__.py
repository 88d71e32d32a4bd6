"""Model files: the registry, the weight format, loading, conversion and the Hugging Face Hub."""
