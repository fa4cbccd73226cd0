"""The base of the toolkit: run settings, errors and exit codes.

`config` holds the typed settings (TrainConfig, EvalConfig, DataConfig, PrepareConfig) from which
the command-line flags are built, with each default written once; `errors` the two exceptions a
run ends with (ToolkitError: bad input, RunFailed: a run that cannot give a valid result);
`exit_codes` every exit status a command returns and what it means; `test_delays` the delays
tests inject through the environment (nothing when unset). Everything may import core;
core imports nothing else of the toolkit.
"""
