"""Serving: an OpenAI-compatible, safe, strategy-aware endpoint on Ray Serve (`soulray serve`)."""
