"""Weight formats: the official release, Hugging Face transformers, and the project's own files."""
