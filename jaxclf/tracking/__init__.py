"""What a run reports while it runs: metrics.jsonl and TensorBoard events, PNG plots, console progress."""
