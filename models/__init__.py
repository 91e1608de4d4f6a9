"""Everything that makes, trains or loads a checkpoint."""
