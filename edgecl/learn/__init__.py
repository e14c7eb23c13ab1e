"""The online learner and its parts."""
from edgecl.learn.learner import LearnerConfig, OnlineLearner

__all__ = ["LearnerConfig", "OnlineLearner"]
