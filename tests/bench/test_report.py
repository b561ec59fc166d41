"""The report pieces the bench and attack grids share: method order, figures, the Markdown file's sections."""

from __future__ import annotations

from tta_norm.bench.report import group_ok_records, method_order, pyplot, save_figure, write_markdown_report


def test_method_order_is_the_grid_order_of_first_appearance():
    order = [(3, "tent"), (0, "tbn"), (2, "tbn"), (1, "src")]
    records = [{"index": i, "cell": {"method": {"name": m}}} for i, m in order]
    assert method_order(records) == ["tbn", "src", "tent"]


def test_ok_records_grouped_by_cell_axes_in_order_of_appearance():
    cells = [("a", 16, "ok"), ("b", 16, "ok"), ("a", 64, "error"), ("a", 16, "ok"), ("b", 64, "ok")]
    records = [{"status": st, "cell": {"setting": s, "batch_size": b, "seed": i}} for i, (s, b, st) in enumerate(cells)]
    groups = group_ok_records(records, ("setting", "batch_size"))
    assert list(groups) == [("a", 16), ("b", 16), ("b", 64)]
    assert [r["cell"]["seed"] for r in groups["a", 16]] == [0, 3]


def test_markdown_report_sections_only_when_there_is_something_to_list(tmp_path):
    path = write_markdown_report(tmp_path, ["# title", "", "| a |"], [], [])
    assert path == tmp_path / "report.md" and path.read_text() == "# title\n\n| a |\n"
    lines = ["# title"]
    write_markdown_report(tmp_path, lines, ["- tbn b16: boom"], [tmp_path / "plots" / "curve_0.png"])
    assert lines == ["# title"]  # the caller's list is left as it was
    assert (tmp_path / "report.md").read_text() == (
        "# title\n\n### failed cells\n\n- tbn b16: boom\n\n### plots\n\n![curve_0](plots/curve_0.png)\n"
    )


def test_save_figure_writes_a_png_and_closes_the_figure(tmp_path):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    path = save_figure(fig, tmp_path / "f.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not plt.fignum_exists(fig.number)


def _bench_record(method, batch_size, severity, seed, error, index=0):
    cell = {"method": {"name": method}, "setting": "continual", "order": "iid", "delta": None,
            "batch_size": batch_size, "severity": severity, "seed": seed}  # fmt: skip
    metrics = {"per_domain": {f"fog@{severity}": error}, "error": error, "ece": 0.1}
    return {"index": index, "status": "ok", "cell": cell, "metrics": metrics, "data": "fake", "identity": {}}


def test_bench_report_keeps_sweeps_apart_and_says_what_is_missing(tmp_path, monkeypatch):
    from tta_norm.bench import report

    records = [_bench_record("tbn", b, sev, 0, err) for b, sev, err in
               ((10, 1, 0.31), (25, 1, 0.28), (10, 5, 0.47), (25, 5, 0.50))]  # fmt: skip
    records += [_bench_record("tent", 10, 1, s, 0.3) for s in (0, 1)]
    curves = []
    real = report.save_figure

    def keep_lines(fig, path):
        curves.extend((path.name, tuple(round(float(y), 6) for y in line.get_ydata()))
                      for ax in fig.axes for line in ax.get_lines())  # fmt: skip
        return real(fig, path)

    monkeypatch.setattr(report, "save_figure", keep_lines)
    text = report.write_report(tmp_path, records, plots=True, missing=3).read_text()
    # one error-vs-batch-size plot per severity, never a pooled flat line
    sweeps = sorted((name, ys) for name, ys in curves if name.startswith("error_vs_batch_size"))
    assert [ys for _, ys in sweeps if len(ys) == 2] == [(31.0, 28.0), (47.0, 50.0)]
    assert "| tent (2 seeds) |" in text and "| tbn (1 seed) |" in text  # uneven seed counts are labelled
    assert "**Incomplete:** 3 of the grid's 9 cells have no stored result" in text


def test_online_curves_share_a_seed_and_uneven_batch_size_cells_say_their_count(tmp_path, monkeypatch):
    """tent ran seeds 0 and 1, tbn only seed 1: the online plot showed tent's seed 0 beside tbn's seed 1 (two
    streams as one); the batch-size table averaged 2 seeds beside 1 without saying so."""
    from tta_norm.bench import report

    def with_curve(record, error):
        record["metrics"]["online_error"] = {"samples": [1, 2], "error": [error, error]}
        return record

    records = [with_curve(_bench_record("tent", 10, 5, seed, error), error) for seed, error in ((0, 0.9), (1, 0.1))]
    records += [with_curve(_bench_record("tbn", 10, 5, 1, 0.3), 0.3), _bench_record("tbn", 20, 5, 1, 0.2),
                _bench_record("tent", 20, 5, 1, 0.2)]  # fmt: skip
    lines, titles = [], []
    real = report.save_figure

    def keep(fig, path):
        if path.name.startswith("online_error"):
            lines.extend((line.get_label(), float(line.get_ydata()[0])) for ax in fig.axes for line in ax.get_lines())
            titles.extend(ax.get_title() for ax in fig.axes)
        return real(fig, path)

    monkeypatch.setattr(report, "save_figure", keep)
    text = report.write_report(tmp_path, records, plots=True).read_text()
    assert sorted(lines) == [("tbn", 30.0), ("tent", 10.0)] and titles[0].endswith("seed 1")
    assert "| tent | 50.0±56.6 (n=2) | 20.0 (n=1) |" in text and "| tbn | 30.0 (n=1) | 20.0 (n=1) |" in text


def test_a_figure_is_written_whole_even_after_its_directory_was_removed(tmp_path):
    """Figures were written in place: a concurrent --overwrite that removes plots/ made the report fail, and a
    reader could see half a PNG."""
    fig, ax = pyplot().subplots()
    ax.plot([0, 1], [1, 0])
    path = save_figure(fig, tmp_path / "plots" / "f.png")  # plots/ does not exist (removed meanwhile)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["f.png"]  # no temporary file left
