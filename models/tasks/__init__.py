"""Data: tasks that sample (inputs, targets) batches and define their training loss."""
