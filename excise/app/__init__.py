"""The application layer: the only code that wires the stages (``locate``, ``edit``, ``probes``)
together. The rest of ``excise`` is the core the stages share and never imports a stage.

- :mod:`excise.app.pipeline`  ``excise run``: the stage registries, the one "build model +
  request" step (:class:`Setup`) shared by run, verify and the sweep, and the run folder;
- :mod:`excise.app.folders`   output folders: written whole or not at all (partial folder,
  SIGINT / SIGTERM cleanup, stale partials of dead processes), the ``run.json`` manifest, and
  what ``--overwrite`` may remove (only the files excise wrote);
- :mod:`excise.app.sweep`     ``excise sweep``: the locate x edit protocol (screen on validation
  people, the utility bar, Pareto pruning, finalists x splits x seeds with retrain oracles);
- :mod:`excise.app.cli`       the ``excise`` command line (typer).
"""
