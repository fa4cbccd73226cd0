"""Settings, errors and exit codes: the base every other part of the toolkit builds on."""
