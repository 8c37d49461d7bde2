"""What a user would otherwise run: baselines measured side by side with splitter."""
