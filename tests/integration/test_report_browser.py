"""The review's HTML report in a real browser: headless Chromium must draw the plots.

The screenshot is kept in the test's tmp_path (pytest keeps the last three runs) for a human to
look at.
"""

from __future__ import annotations

import base64
import io
import re

from PIL import Image

from propscope.review.report import render_html
from propscope.review.report.plots import BASELINE_COLOR, CANDIDATE_COLOR
from tests.browser import screenshot_html
from tests.review_samples import color_pixels, sample_review

PLOT_SRC = re.compile(r'(<img class="plot"[^>]*? src=")data:image/png;base64,[^"]+"')


def blank_png_uri() -> str:
    buffer = io.BytesIO()
    Image.new("RGBA", (1, 1), (0, 0, 0, 0)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def test_chromium_draws_the_plots_of_the_report(tmp_path):
    html = render_html(sample_review())
    without_plots, replaced = PLOT_SRC.subn(rf'\g<1>{blank_png_uri()}"', html)
    assert replaced == 4

    counts = {}
    for name, page in {"report": html, "control": without_plots}.items():
        (tmp_path / f"{name}.html").write_text(page, encoding="utf-8")
        screenshot_html(tmp_path / f"{name}.html", tmp_path / f"{name}.png", height=3600)
        with Image.open(tmp_path / f"{name}.png") as shot:
            assert shot.size == (1280, 3600)
            counts[name] = {
                color: color_pixels(shot, color) for color in (CANDIDATE_COLOR, BASELINE_COLOR)
            }
    print(f"screenshots in {tmp_path}: colored pixels {counts}")

    for color in (CANDIDATE_COLOR, BASELINE_COLOR):
        # The plots draw thousands of pixels in each role's color (about 3,600 each); without
        # them only the models table's swatch and the p values under the path images remain
        # (about 300).
        assert counts["report"][color] > 2500, (color, counts)
        assert counts["control"][color] < counts["report"][color] / 5, (color, counts)
