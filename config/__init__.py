"""The config: read a file, apply overrides, check it, build objects by name (config/parser.py)."""
