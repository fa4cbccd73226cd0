"""What a run shows and writes beside its results: console, library logs, trackers, curves."""
