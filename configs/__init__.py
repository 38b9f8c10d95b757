"""Config files: `get_config(arg)` per method (see each docstring for the command that runs it)."""
