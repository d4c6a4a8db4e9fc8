"""probes: is the knowledge really gone, and what else broke?

``verify(model, request, oracle=..., suite=[...])`` runs the suites registered in ``SUITES``
(:mod:`probes.suites`) and returns a :class:`excise.report.Report`; ``write_plots(report,
folder)`` draws its figures; ``screen_known(model, request)`` drops facts a model never knew.
"""

from probes.attacks import ATTACKS, AttackConfig
from probes.behaviour import perplexity, recall
from probes.knowledge import knowledge, screen_known
from probes.plots import write_plots
from probes.suites import SUITES, SuiteResult, VerifySettings, register_suite, suite
from probes.verify import verify

__all__ = ["ATTACKS", "SUITES", "AttackConfig", "SuiteResult", "VerifySettings", "knowledge",
           "perplexity", "recall", "register_suite", "screen_known", "suite", "verify",
           "write_plots"]
