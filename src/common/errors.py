"""Errors the user can fix by changing a key, a file or a command: a stage prints them as one line.

`stage_main` (src/common/config.py) catches UserError, logs its message without a traceback and exits 2.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A refusal with a one-line message that names the key, file or folder and what to do."""


class ConfigError(UserError, ValueError):
    """A config key has a wrong type, is out of range, unknown, or conflicts with the trained experiment."""


class ExperimentError(UserError):
    """The experiment folder refuses the request (bad exp_name, a run already there, a stale export...)."""


class StaleArtifactError(ExperimentError):
    """An export was made from another checkpoint than the experiment's current best.pt."""
