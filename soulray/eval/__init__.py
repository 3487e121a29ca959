"""`soulray eval` and `soulray report`: evidence that a model listens and comforts better."""
