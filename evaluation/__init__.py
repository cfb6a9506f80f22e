"""The evaluation protocol: tau and wall-clock speedup of a draft on benchmark prompts, as the anchors report them."""
