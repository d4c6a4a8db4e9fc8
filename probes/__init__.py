"""probes: is the knowledge really gone, and what else broke?"""

from probes.behaviour import perplexity, recall
from probes.verify import SUITES, verify

__all__ = ["SUITES", "perplexity", "recall", "verify"]
