"""Moving models in and out of the ecosystem: Hugging Face transformers (hf) and llama.cpp (gguf)."""
