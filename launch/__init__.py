"""Entry points: the `draft-opd` command and `python -m draft_opd.launch.<job>` for `ray job submit`."""
