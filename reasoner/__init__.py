"""Ask over memory: context assembly, the LLM with progressive visual dropout, streamed answers (issue 3)."""
