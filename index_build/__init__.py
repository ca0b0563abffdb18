"""Embed a dataset into a FAISS index with metadata, and search it."""
