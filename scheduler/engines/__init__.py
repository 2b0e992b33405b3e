"""The Engine interface and its implementations: llama.cpp, simulated."""
