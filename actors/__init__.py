"""Ray rollout actors: a frozen target and the current draft run target-assisted rollout and emit trajectories."""
