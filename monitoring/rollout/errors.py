"""The rollout errors (a leaf module: the routes sources and the controller both raise them)."""


class RolloutError(RuntimeError):
    """A rollout cannot go on (route or variant missing, routes source unreadable or invalid)."""


class RoutesConflict(RolloutError):
    """The routes source changed between our read and our write."""
