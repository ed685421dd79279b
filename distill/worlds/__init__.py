"""Built-in synthetic video worlds (data + prompts), shared by distill, tests and bench."""
