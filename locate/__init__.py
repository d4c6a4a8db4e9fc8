"""locate: where does the model keep what the request asks to forget?

Every method takes a model handle and a ForgetRequest (plus the sites to score, globs allowed)
and returns an :class:`excise.importance.Importance`.
"""

from locate._grads import StatsCache
from locate.fisher import fisher

METHODS = {"fisher": fisher}

__all__ = ["METHODS", "StatsCache", "fisher"]
