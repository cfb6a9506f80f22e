"""The DeepSpeed ZeRO learner: replay forward, losses (SFT baselines, Draft-OPD), checkpoints, weight publishing."""
