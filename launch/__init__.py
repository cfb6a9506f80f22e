"""Entry points: the `draft-opd` command and `python -m launch.<job>` for `ray job submit`."""
