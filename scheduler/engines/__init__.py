"""The Engine interface and its implementations: llama.cpp, simulated, upstream OpenAI-compatible servers."""
