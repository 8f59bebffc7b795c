import math
import shutil
import subprocess

import pytest

from dtm.report import (
    ReportData,
    best_per_column,
    frontier_gap,
    headline_markdown,
    mean_std,
    pareto_frontier,
    tradeoff_summary,
    write_report,
)


def test_mean_std_hand_computed():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([0.5]) == (0.5, 0.0)
    assert all(math.isnan(v) for v in mean_std([]))


def test_best_per_column_and_bold_cell():
    scores = {"vanilla": {"k": [0.7, 0.8], "i": [0.9]}, "DTM": {"k": [0.9, 0.9], "i": [0.6]}}
    assert best_per_column(scores, ["k", "i"]) == {"k": "DTM", "i": "vanilla"}
    md = headline_markdown(ReportData("t", scores, ["k", "i"]))
    assert "| DTM | **0.900 ± 0.000** | 0.600 |" in md
    assert "| vanilla | 0.750 ± 0.071 | **0.900** |" in md


def test_pareto_frontier_drops_dominated_points():
    pts = [(0.0, 0.9), (0.5, 0.8), (0.4, 0.7), (1.0, 0.5), (1.0, 0.4)]
    assert pareto_frontier(pts) == [(0.0, 0.9), (0.5, 0.8), (1.0, 0.5)]


def test_frontier_gap_interpolates_between_front_points():
    ref = [(0.0, 0.9), (0.5, 0.8), (1.0, 0.5)]
    # at x=0.75 the chord from (0.5, 0.8) to (1.0, 0.5) is at 0.65
    assert frontier_gap((0.75, 0.70), ref) == pytest.approx(0.05)
    assert frontier_gap((0.75, 0.60), ref) == pytest.approx(-0.05)
    assert frontier_gap((1.2, 0.6), ref) == pytest.approx(0.1)  # beyond the front: vs its last point
    assert frontier_gap((0.0, 0.95), ref) == pytest.approx(0.05)


def sample_report() -> ReportData:
    scores = {
        "base": {"knowledge": [0.87, 0.87], "instruction": [0.0, 0.0]},
        "vanilla": {"knowledge": [0.78, 0.80], "instruction": [0.72, 0.73]},
        "vanilla @ 0.5": {"knowledge": [0.84, 0.85], "instruction": [0.65, 0.66]},
        "WiSE-FT 0.5": {"knowledge": [0.95, 0.96], "instruction": [0.05, 0.10]},
        "DTM": {"knowledge": [0.96, 0.95], "instruction": [0.65, 0.68]},
    }
    groups = {"base": "base", "vanilla": "vanilla", "vanilla @ 0.5": "vanilla checkpoints", "WiSE-FT 0.5": "wise-ft", "DTM": "dtm"}
    return ReportData(
        title="lab", scores=scores, columns=["knowledge", "instruction"], notes=["seeds: 2"], groups=groups,
        tax_curve={"knowledge": {0.5: [0.84, 0.85], 1.0: [0.78, 0.80]}},
        losses={0.5: [(1.0, 1.2), (1.1, 1.3)], 1.0: [(0.5, 1.25), (0.6, 1.3)]},
        tradeoff_axes=("knowledge", "instruction"),
        portions=[{"portion": 1, "examples": 10, "sources": {"a": 5, "b": 5}}],
        compute={"DTM": {"seconds": 12.0}, "vanilla": {"seconds": 11.0}},
        controls=[ReportData("no-bias control", {"DTM": {"knowledge": [0.9]}}, ["knowledge"])],
    )


def test_tradeoff_summary_places_dtm_against_the_frontier():
    text = tradeoff_summary(sample_report())
    # frontier at instruction 0.665: chord from WiSE-FT (0.075, 0.955) to vanilla@0.5 (0.655, 0.845)... and on to vanilla
    assert text.startswith("DTM lies above the frontier")
    assert "No other model has both" in text
    data = sample_report()
    data.scores["L2"] = {"knowledge": [0.97], "instruction": [0.70]}
    assert "as much knowledge and instruction as DTM: L2." in tradeoff_summary(data)


def test_write_report_files(tmp_path):
    md, page = write_report(sample_report(), tmp_path)
    text = md.read_text()
    assert "**0.955 ± 0.007**" in text and "tax_curve.png" in text and "no-bias control" in text
    assert (tmp_path / "tradeoff.png").stat().st_size > 1000
    assert page.read_text().count("data:image/png;base64,") == 3


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (make test installs it where apt is available)")
def test_report_renders_in_headless_chromium(tmp_path):
    _, page = write_report(sample_report(), tmp_path)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"]
    # The page's own script-free DOM, as the browser parsed it, with image decode state checked by JS.
    probe = tmp_path / "probe.html"
    probe.write_text(
        page.read_text().replace(
            "</body>",
            "<script>window.onload=()=>{const imgs=[...document.images];"
            "document.title='rows='+document.querySelectorAll('#headline tbody tr').length+"
            "';imgs='+imgs.filter(i=>i.complete&&i.naturalWidth>100).length+';best='+document.querySelectorAll('#headline td.best').length;}</script></body>",
        )
    )
    out = subprocess.run([CHROMIUM, *flags, "--dump-dom", "--virtual-time-budget=3000", probe.as_uri()], capture_output=True, text=True, timeout=120)
    assert "<title>rows=5;imgs=3;best=2</title>" in out.stdout, out.stderr[-2000:]
