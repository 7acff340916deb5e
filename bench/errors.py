"""The errors of a run that end it with one line on stderr (bench.cli maps each to its exit code)."""


class UserError(Exception):
    """A mistake the user can fix (paths, existing output, data); printed as one line, exit 2."""


class StageError(Exception):
    """A shared stage (the env's SFT and pairs, the reward model) failed: one line, exit 1. The sweep
    cannot start without it; a run that had just started is removed, as after a UserError."""


class Interrupted(Exception):
    """SIGINT (Ctrl-C) or SIGTERM stopped the run: Ray was shut down, nothing half-written; str() says
    how to continue (exit 130)."""
