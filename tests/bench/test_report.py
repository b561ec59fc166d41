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
