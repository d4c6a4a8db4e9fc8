"""Every plot function renders to a PNG file (Agg backend), returns its Axes, never shows."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

import locate  # noqa: E402
from excise import plots  # noqa: E402
from locate.plots import agreement_matrix, causal_trace_heatmap  # noqa: E402


def _saved(ax, path):
    assert hasattr(ax, "figure"), "plot functions return Axes"
    plots.save(ax, path)
    assert path.exists() and path.stat().st_size > 2000
    return path


@pytest.fixture(autouse=True)
def _no_show(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("plot functions must never call show()")

    monkeypatch.setattr(plt, "show", boom)


def test_importance_plots(planted, tmp_path):
    imp = locate.fisher(planted.handle, planted.request, "blocks.*.mlp.*")
    _saved(plots.importance_heatmap(imp), tmp_path / "heat.png")
    _saved(plots.top_units_bar(imp, k=5), tmp_path / "bar.png")
    _saved(imp.plot("heatmap"), tmp_path / "heat2.png")
    with pytest.raises(ValueError, match="unknown plot kind"):
        imp.plot("pie")


def test_metrics_bars(tmp_path):
    m = {"before": {"forget_recall": 1.0, "retain_recall": 1.0},
         "after": {"forget_recall": 0.2, "retain_recall": 0.97},
         "oracle": {"forget_recall": 0.05, "retain_recall": 1.0}}
    _saved(plots.metrics_bars(m, ["forget_recall", "retain_recall"]), tmp_path / "m.png")


def test_causal_trace_and_agreement_plots(tiny, tiny_request, tmp_path):
    t = locate.trace(tiny.model, list(tiny_request.forget)[:2], samples=1)
    axes = t.plot()
    _saved(axes[0], tmp_path / "trace_all.png")
    _saved(causal_trace_heatmap(t, "mlp.out"), tmp_path / "trace_mlp.png")
    agree = locate.compare({"a": locate.fisher(tiny.model, tiny_request, "blocks.*.mlp.post"),
                            "b": locate.activations(tiny.model, tiny_request,
                                                    "blocks.*.mlp.post")})
    _saved(agreement_matrix(agree["spearman"]), tmp_path / "agree.png")
