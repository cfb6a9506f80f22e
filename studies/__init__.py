"""Studies that drive whole training jobs: the offline SFT curve (`make curve`) and the OPD-vs-SFT grid (`make study`).

Checkpoints are scored by text-walked tau (`studies.text_eval`), which equals decoding's accept lengths at T = 0.
"""
