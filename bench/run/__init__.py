"""`prefbench run`: driver (validate → start Ray → prepare → sweep → results → report; resume,
signals, the dry-run plan), prepare (the env and reward-model stages, cached by content, and the
checks before the sweep), ray_runner (the ONE module that talks to Ray Train and Tune), timing."""
