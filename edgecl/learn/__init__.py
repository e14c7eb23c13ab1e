"""The online learner and its parts. `LearnerConfig` imports without torch; `OnlineLearner`
brings it in on first use."""
from __future__ import annotations

__all__ = ["LearnerConfig", "OnlineLearner"]


def __getattr__(name: str):
    if name == "LearnerConfig":
        from edgecl.learn.settings import LearnerConfig
        return LearnerConfig
    if name == "OnlineLearner":
        from edgecl.learn.learner import OnlineLearner
        return OnlineLearner
    raise AttributeError(f"module 'edgecl.learn' has no attribute {name!r}")
