"""probes: is the knowledge really gone, and what else broke?

``verify(model, request, oracle=..., suite=[...])`` runs the suites named in ``SUITES`` and
returns a :class:`excise.report.Report`; ``write_plots(report, folder)`` draws its figures.
"""

from probes.attacks import ATTACKS, AttackConfig
from probes.behaviour import perplexity, recall
from probes.plots import write_plots
from probes.verify import SUITES, verify

__all__ = ["ATTACKS", "AttackConfig", "SUITES", "perplexity", "recall", "verify", "write_plots"]
