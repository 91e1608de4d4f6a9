"""Figures as a reader meets them: the HTML draws offline in a real browser, menus included; the PNG is a picture."""

from __future__ import annotations

import subprocess

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import pytest
from PIL import Image

from forethought.analyses.plots import (
    MENU_LABEL,
    PLOTLY_JS,
    chromium,
    difference_heatmap,
    facet_labels_as_values,
    log_ticks,
    loss_curves_figure,
    measured_layers,
    save_figure,
    signed,
    static_figure,
)

needs_chromium = pytest.mark.skipif(chromium() is None, reason="no Chromium here (CI installs one: .ci/run)")


def _figure_with_a_menu() -> go.Figure:
    figure = go.Figure([go.Scatter(x=[0, 1, 2], y=[1, 3, 2], name="top1"),
                        go.Scatter(x=[0, 1, 2], y=[2, 1, 3], name="top5", visible=False)])
    return figure.update_layout(updatemenus=[dict(buttons=[
        dict(label="top1", method="update", args=[{"visible": [True, False]}]),
        dict(label="top5", method="update", args=[{"visible": [False, True]}])])])


def _browser(*flags: str, page) -> subprocess.CompletedProcess:
    """Headless Chromium on a local page with the network switched off (a page must not need it)."""
    return subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                           "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>", *flags,
                           page.as_uri()], capture_output=True, text=True, timeout=120, check=True)


def test_the_html_loads_plotly_from_beside_it(tmp_path):
    written = save_figure(_figure_with_a_menu(), tmp_path / "a")
    save_figure(_figure_with_a_menu(), tmp_path / "b")
    assert written == [tmp_path / "a.html", tmp_path / PLOTLY_JS]  # one shared copy of the library
    html = (tmp_path / "a.html").read_text()
    assert f'src="{PLOTLY_JS}"' in html and "cdn.plot.ly" not in html and len(html) < 100_000


@needs_chromium
def test_a_figure_draws_offline_in_a_headless_browser_with_its_menus(tmp_path, monkeypatch):
    monkeypatch.setenv("FORETHOUGHT_PNG", "1")
    written = save_figure(_figure_with_a_menu(), tmp_path / "figure")
    assert tmp_path / "figure.png" in written
    dom = _browser("--dump-dom", page=tmp_path / "figure.html").stdout
    assert dom.count('class="main-svg"') >= 1 and "updatemenu-container" in dom  # drawn, with its menu
    assert dom.count('class="scatterlayer') >= 1 and ">top1<" in dom
    _browser("--window-size=1100,650", f"--screenshot={tmp_path / 'shot.png'}", page=tmp_path / "figure.html")
    for picture in (tmp_path / "shot.png", tmp_path / "figure.png"):
        pixels = np.asarray(Image.open(picture).convert("L"))
        assert (pixels < 250).mean() > 0.05, picture  # not a white page: the plot area, lines and text are drawn
    (tmp_path / PLOTLY_JS).unlink()  # and without the library beside it, the page is blank: the test can fail
    assert "main-svg" not in _browser("--dump-dom", page=tmp_path / "figure.html").stdout


def test_a_picture_leaves_out_the_menus_and_their_labels_and_keeps_other_notes():
    figure = _figure_with_a_menu().add_annotation(text="metric", name=MENU_LABEL, x=0, y=1.1, showarrow=False)
    figure.add_annotation(text="n = 40", x=1, y=2, showarrow=False)
    static = static_figure(figure)
    assert static.layout.updatemenus == () and [note.text for note in static.layout.annotations] == ["n = 40"]
    assert len(figure.layout.updatemenus) == 1 and len(figure.layout.annotations) == 2  # the figure is untouched
    assert [trace.visible for trace in static.data] == [None, False]  # the view it opens on


@pytest.mark.parametrize("value, text", [(-0.0004, "0.000"), (0.0004, "0.000"), (-0.0006, "-0.001"),
                                         (0.0126, "+0.013"), (0.0, "0.000")])
def test_a_difference_that_rounds_to_zero_has_no_sign(value, text):
    assert signed(value) == text


def test_a_heatmap_of_exact_zeros_says_so_instead_of_spreading_a_scale():
    rows = pd.DataFrame({"layer": [0, 0, 1, 1], "tau": [1, 2, 1, 2], "value": 0.0, "ci_low": 0.0, "ci_high": 0.0})
    figure = difference_heatmap(rows, "P", "P")
    assert "every difference is exactly 0" in figure.layout.title.text
    assert figure.data[0].zmax < 0.01 and "-0.000" not in str(figure.data[0].text)


def test_a_log_loss_axis_labels_its_ticks_in_full():
    """Plotly labels minor log ticks with a bare digit ("1, 9, 8 … 2, 0.1"); the loss axis names each value."""
    history = [{"step": s, "train_loss": 1.3 * 0.8 ** s, "eval_loss": 1.3 * 0.8 ** s} for s in range(0, 12, 2)]
    axis = loss_curves_figure({"vanilla": history}, baseline=1.26).layout.yaxis
    assert axis.type == "log" and list(axis.ticktext) == ["0.2", "0.3", "0.5", "1"]
    assert list(axis.tickvals) == pytest.approx([0.2, 0.3, 0.5, 1.0])
    narrow = [{"step": s, "train_loss": 10.5 - s, "eval_loss": 10.5 - s} for s in range(0, 7)]  # 4.5 … 10.5 nats
    axis = loss_curves_figure({"vanilla": narrow}).layout.yaxis  # within a decade: every digit, not "5" alone
    assert list(axis.ticktext) == ["4", "5", "6", "7", "8", "9", "10"]
    fine_tuning = [{"step": s, "train_loss": 4.6 - 0.2 * s, "eval_loss": 4.6 - 0.2 * s} for s in range(0, 8)]  # 3.2 …
    axis = loss_curves_figure({"vanilla": fine_tuning}).layout.yaxis  # one digit inside (4): halves instead
    assert list(axis.ticktext) == ["3", "3.5", "4", "4.5", "5", "5.5"]
    assert log_ticks(3.31, 3.39) == pytest.approx([2.8, 2.9, 3.0, 3.1, 3.2, 3.3, 3.4, 3.5, 3.6, 3.7, 3.8, 3.9, 4.0])


def test_facets_keep_their_y_range_and_long_labels_and_titles_are_broken_into_lines(tmp_path):
    """Three regressions seen in the seed-0 bracket's pictures: facets drawn on plotly's empty −1 … 4 y range once
    the layers' x range was set, neighbouring panel titles written over each other, a title cut off at the right."""
    rows = pd.DataFrame({"layer": [0, 1, 0, 1], "value": [0.1, 0.2, 0.15, 0.25],
                         "checkpoint": ["vanilla"] * 2 + ["vanilla at the myopic loss"] * 2})
    figure = measured_layers(px.line(rows, x="layer", y="value", facet_col="checkpoint"), rows["layer"])
    assert figure.layout.yaxis.autorange is True and figure.layout.yaxis2.autorange is True
    assert figure.layout.xaxis.range == (-0.5, 1.5)
    pinned = measured_layers(go.Figure(go.Scatter(x=[0, 1], y=[0, 1])).update_yaxes(range=[0, 2]), rows["layer"])
    assert pinned.layout.yaxis.range == (0, 2) and pinned.layout.yaxis.autorange is None  # a range given stays
    labels = [note.text for note in facet_labels_as_values(figure).layout.annotations]
    assert labels == ["vanilla", "vanilla at the<br>myopic loss"]
    assert list(figure.layout.xaxis.ticktext) == ["0", "1"]
    many = measured_layers(go.Figure(), pd.Series(range(31))).layout.xaxis  # SmolLM2's 31 overlapped in a facet
    assert list(many.tickvals) == list(range(31))
    assert [text for text in many.ticktext if text] == ["0", "5", "10", "15", "20", "25", "30"]
    figure.update_layout(title="word " * 40)
    save_figure(figure, tmp_path / "long")
    html = (tmp_path / "long.html").read_text()
    broken = "word<br>word" in html or "word\\u003cbr\\u003eword" in html  # plotly escapes "<" in its JSON
    assert broken and figure.layout.title.text == "word " * 40  # the figure given is left as it was
