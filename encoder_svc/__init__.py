"""GPU encoder service: clips from many streams, batched, encoded to 64 tokens each, written to memory (issue 4)."""
