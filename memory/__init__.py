"""Durable timestamped token memory: Redis or an embedded file-backed store, plus a FAISS clip index (issue 3)."""
