"""Data modules: text files of the user's (classifier and causal LM rows) and seeded token tasks."""
