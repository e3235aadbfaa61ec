"""Figures never touch the user's matplotlib state (backend, pyplot's figure list)."""

from __future__ import annotations

import matplotlib
import torch

from gradshield.defenses.concealment import conceal
from gradshield.evaluation.plots import figure_png, plot_gradient_sign
from gradshield.models import create_model


def test_plot_keeps_the_users_backend_and_registers_no_pyplot_figure():
    from matplotlib import pyplot as plt

    matplotlib.use("svg")  # a user's choice, not Agg
    before = set(plt.get_fignums())
    torch.manual_seed(0)
    model = create_model("compact", width=0.25).eval()
    x, y = torch.rand(2, 3, 32, 32), torch.tensor([0, 1])
    fig = plot_gradient_sign({"plain": model, "gcm": conceal(model)}, x, y)
    png = figure_png(fig)
    assert matplotlib.get_backend().lower() == "svg"
    assert set(plt.get_fignums()) == before
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
