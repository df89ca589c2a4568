"""Configuration, one floor above the library's parts (data, modeling, solver) and below
everything that runs them (engine, evaluation tools, cli, study):

- `registry`: THE allowlist of config targets (`targets()`, `FILE_ARGUMENTS`).
- `stored`: checking and building configs read back from files (`check_stored_config`,
  `build_stored`, `build_partial`), without importing or calling what a file names.
- `build`: the model, the data source and the optimizer with its schedule from config nodes.
- `schemas`: the typed schemas of the yaml files (`register_configs`) and the rules types
  cannot express (`check_train_config`).
- `compose`: the config folder (`CONFIG_DIR`), composing and checking a config as a tool
  will (`check_config`), override quoting.

Importing this package (and `registry`, `stored`, `schemas`, `compose`) loads neither torch
nor the data and model code; `build` does.
"""
