"""The reporting tests' shared fixture: the figures the plot functions draw, kept for inspection."""

import pytest

from raysys.reporting import fn_study, plots, run_figures


@pytest.fixture
def drawn(monkeypatch):
    """The figures the plot functions draw, kept open for inspection (each still written to its file)."""
    figures, save = [], plots.save_figure

    def keep(fig, path, reading=None):
        figures.append(fig)
        save(fig, path, reading)

    for module in (plots, run_figures, fn_study):
        monkeypatch.setattr(module, "save_figure", keep)
    yield figures
    for fig in figures:
        plots.pyplot().close(fig)
