"""The Markdown report (bench/report.py) and its plots (bench/plots/) from a results document."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.container import BarContainer
import numpy as np
import pytest

from bench import labels
from bench.labels import fmt
from bench.plots import PLOT_FILES
from bench.plots import e2e as e2e_plots
from bench.plots.throughput import ingest_bars
from bench.report import main as report_main
from bench.report import render_report
from bench.schema import SCENARIOS, Document, Git, Machine, Options, Peer, Result, Stats

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STAGES = ("receive", "completion_wait", "assemble", "queue_wait", "stage:denoise", "derive", "export")
SENDERS = ("appliance-scu", "dcmtk-storescu")


def _result(rid: str, scenario: str, samples, *, params=None, metric="latency", unit="s", better="lower",
            **kw) -> Result:
    samples = [float(x) for x in samples]
    return Result(id=rid, scenario=scenario, title=rid, params=params or {}, metric=metric, unit=unit,
                  better=better, warmup=kw.pop("warmup", 1), samples=samples, stats=Stats.of(samples), **kw)


def _document(results: list[Result], *, scenarios=None, skipped=None, quick=False, gpu=False,
              dirty=False, config=None) -> Document:
    return Document(
        started=datetime(2026, 11, 24, 9, 30, 0, tzinfo=timezone.utc), wall_s=1834.2,
        machine=Machine(hostname="vm", os="Linux 6.1 x86_64", cpu="Intel(R) Xeon(R) Processor", cores=2,
                        memory_gib=7.7, gpu="NVIDIA H100 80GB HBM3" if gpu else None,
                        gpu_driver="550.54.15" if gpu else None, compute_capability="9.0" if gpu else None),
        git=Git(revision="b96cba6", dirty=dirty),
        versions={"python": "3.11.7", "numpy": "2.4.6", "onnxruntime": "1.22.0", "tensorrt": None},
        options=Options(quick=quick, repeats=5, warmup=1,
                        scenarios=scenarios or sorted({r.scenario for r in results}),
                        command="appliance bench --out bench/results/run"),
        config=config or {}, results=results, skipped=skipped or {})


def _e2e(rng, slices: int, sender: str, concurrency: int, n: int = 5, stage_samples: bool = False) -> list[Result]:
    """A first-byte result with stages (and their raw samples, with ``stage_samples``), and its
    last-image twin, growing with slices and studies."""
    base = 0.02 * slices * (1.0 + 0.6 * (concurrency - 1)) * (1.15 if sender == "dcmtk-storescu" else 1.0)
    params = {"pipeline": "ct-denoise", "slices": slices, "rows": 512, "cols": 512, "sender": sender,
              "concurrency": concurrency}
    size = f"512x512x{slices}"
    samples = base * (1 + 0.05 * rng.standard_normal(n * concurrency)).clip(0.8)
    shares = dict(zip(STAGES, (0.35, 0.05, 0.08, 0.02, 0.4, 0.04, 0.06)))
    stages = {s: Stats.of(samples * k) for s, k in shares.items()}
    raw = {s: [float(x) for x in samples * k] for s, k in shares.items()} if stage_samples else {}
    extra = {"batch_makespan_s_p50": float(base * 1.1)} if concurrency > 1 else {}
    first = _result(f"e2e/ct-denoise/{size}/{sender}/c{concurrency}/first_byte_to_last_response", "e2e", samples,
                    params=params | {"measure": "first_byte_to_last_response"}, stages=stages, stage_samples=raw,
                    extra=extra)
    last = _result(f"e2e/ct-denoise/{size}/{sender}/c{concurrency}/last_image_to_last_response", "e2e",
                   samples * 0.55, params=params | {"measure": "last_image_to_last_response"}, extra=extra)
    return [first, last]


def full_document() -> Document:
    rng = np.random.default_rng(7)
    results: list[Result] = []
    for slices in (64, 128, 300, 600):
        for sender in SENDERS:
            results += _e2e(rng, slices, sender, 1)
    for c in (2, 4):
        for sender in SENDERS:
            results += _e2e(rng, 300, sender, c)
    # ingest: the appliance against dcmtk storescp; the peer result is also a result of its own
    for slices in (128, 300):
        size = f"512x512x{slices}"
        nbytes = slices * 512 * 512 * 2 + slices * 1500
        params = {"sender": "dcmtk-storescu", "slices": slices, "rows": 512, "cols": 512, "bytes": nbytes}
        dcmtk = _result(f"ingest/dcmtk-storescp/{size}/dcmtk-storescu", "ingest", [400, 410, 420, 405, 415],
                        params=params | {"receiver": "dcmtk-storescp"}, metric="instances_per_s", unit="1/s",
                        better="higher", extra={"mb_per_s": 210.0})
        ours = [350, 352, 348, 351, 349]
        ratio = Stats.of(ours).p50 / dcmtk.stats.p50
        results += [
            _result(f"ingest/appliance/{size}/dcmtk-storescu", "ingest", ours,
                    params=params | {"receiver": "appliance"},
                    metric="instances_per_s", unit="1/s", better="higher", extra={"mb_per_s": 184.0},
                    peer=Peer(name="dcmtk storescp", id=dcmtk.id, stats=dcmtk.stats, ratio=ratio)),
            dcmtk,
        ]
    for backend, ms in (("onnxruntime", 154.0), ("tensorrt", 2.1)):
        for slices in (64, 300):
            t = ms * slices / 1000
            samples = [t * k for k in (1.0, 1.02, 0.99, 1.05, 1.01)]
            p50 = Stats.of(samples).p50
            results.append(_result(f"denoise/{backend}/512x512x{slices}", "denoise", samples,
                                   params={"backend": backend, "model": "reference-redcnn 1.0.0", "slices": slices,
                                           "rows": 512, "cols": 512, "slab": 16},
                                   extra={"ms_per_slice": 1000 * p50 / slices,
                                          "mvoxels_per_s": 512 * 512 * slices / 1e6 / p50}))
    results.append(_result("recon/host/pwls-tv/128^3", "recon", [84.7, 85.1, 84.2],
                           params={"backend": "host", "algorithm": "pwls-tv", "n": 128, "views": 180,
                                   "detector": [64, 256], "iterations": 5, "subsets": 4, "beta": 0.03},
                           extra={"seconds_per_iteration": 16.94}))
    results.append(_result("recon/host/fdk/128^3", "recon", [6.21, 6.25, 6.19],
                           params={"backend": "host", "algorithm": "fdk", "n": 128, "views": 180,
                                   "detector": [64, 256], "iterations": 1}))
    for backend, scale in (("host", 1.0), ("cuda", 120.0)):
        for op, g in (("forward_joseph", 0.136), ("adjoint_joseph", 0.0453), ("backproject_fdk", 0.0576)):
            results.append(_result(f"kernels/{backend}/{op}/128^3", "kernels",
                                   [g * scale * k for k in (0.98, 1.0, 1.01)],
                                   params={"backend": backend, "operation": op, "n": 128, "views": 180,
                                           "detector": [64, 256]},
                                   metric="throughput", unit="GUPS", better="higher"))
    return _document(results, gpu=True, dirty=True, skipped={"kernels/metal": "no such backend on Linux"},
                     config={"node": {"port": 11112}, "completion": {"idle_seconds": 2.0}})


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> tuple[Document, Path, str]:
    doc = full_document()
    out = tmp_path_factory.mktemp("full")
    # round trip through JSON: the renderer reads what the runner wrote
    doc = Document.model_validate_json(doc.dump())
    report = render_report(doc, out, results_name="results.json")
    return doc, out, report.read_text()


def _assert_png(path: Path) -> None:
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 10_000, f"{path.name}: {len(data)} bytes, suspiciously small"
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300, img.shape
    assert float(img[..., :3].std()) > 0.02, "a blank image"


def _table_rows(report: str, needle: str) -> list[str]:
    return [line for line in report.splitlines() if line.startswith("|") and needle in line]


def test_fmt_keeps_significant_digits():
    assert fmt(12.3) == "12.30"
    assert fmt(0.12345) == "0.1235"
    assert fmt(1234.4) == "1234"
    assert fmt(12345.6) == "12346"
    assert fmt(0) == "0"
    assert fmt(3.2e-6) == "3.200e-06"
    assert fmt(None) == "—"
    assert labels.fmt_ratio(0.8477) == "0.85×"
    assert labels.fmt_duration(1834.2) == "30 min 34 s"


def test_header_records_where_and_how(full):
    doc, _, report = full
    assert report.startswith("# appliance bench report")
    assert "`b96cba6` **dirty**" in report
    assert "Intel(R) Xeon(R) Processor, 2 cores, 7.70 GiB memory" in report
    assert "NVIDIA H100 80GB HBM3, driver 550.54.15, compute capability 9.0" in report
    assert "tensorrt (not installed)" in report and "onnxruntime 1.22.0" in report
    assert "full; 5 repeats after 1 warm-up run;" in report
    assert "[results.json](results.json)" in report
    assert "- `kernels/metal`: no such backend on Linux" in report
    assert "2026-11-24 09:30:00+00:00" in report and "30 min 34 s" in report
    assert "## How to read this report" in report and "n = 20" in report
    assert '"idle_seconds": 2.0' in report  # the daemon's configuration, folded away


def test_scenario_tables_with_n_stats_peers_and_extras(full):
    doc, _, report = full
    for title in ("## End to end (e2e)", "## Ingest", "## Denoise", "## Reconstruction (recon)",
                  "## Projector kernels"):
        assert title in report
    # every result has a row, addressed by its id
    for r in doc.results:
        rows = _table_rows(report, f"`{r.id}`")
        assert len(rows) == 1, r.id
        s = r.stats
        for v in (s.min, s.p50, s.p95, s.p99, s.max):
            assert f"| {fmt(v)} |" in rows[0], (r.id, v, rows[0])
        assert f"| {s.n} |" in rows[0]
    # e2e rows are readable: series, sender, concurrency, measure
    row = _table_rows(report, "`e2e/ct-denoise/512x512x300/dcmtk-storescu/c4/last_image_to_last_response`")[0]
    assert "| ct-denoise | 512×512×300 | dcmtk-storescu | 4 | 20 |" in row
    assert "### first byte → last response" in report and "### added latency: last image → last response" in report
    # ingest: the peer's p50 and the ratio, and MB/s
    appliance = doc.result("ingest/appliance/512x512x300/dcmtk-storescu")
    row = _table_rows(report, f"`{appliance.id}`")[0]
    assert "| dcmtk storescp | 410.0 | 0.85× |" in row
    assert "| 184.0 |" in row
    assert "| MB/s p50 |" in report and "ratio = this p50 / the peer's p50" in report
    # denoise extras
    denoise = doc.result("denoise/onnxruntime/512x512x300")
    row = _table_rows(report, f"`{denoise.id}`")[0]
    assert f"| s | {fmt(denoise.extra['ms_per_slice'])} | {fmt(denoise.extra['mvoxels_per_s'])} |" in row
    assert "| s | 155.5 | 1.685 |" in row
    assert "| ms/slice p50 | Mvoxel/s p50 |" in report
    # recon and kernels read their params
    assert "| host | pwls-tv | 128³ | 180 | 64×256 | 5 | 4 | beta=0.03000 |" in report
    assert "| s/iteration p50 |" in report and "| 16.94 |" in report
    assert "| batch makespan p50 (s) |" in report
    assert "| cuda | forward_joseph | 128³ | 180 | 64×256 |" in report
    assert "| GUPS |" in report
    # few samples: the tables say so
    assert "n < 20 in" in report
    assert "higher is better" in report and "lower is better" in report


def test_e2e_stage_breakdown(full):
    doc, _, report = full
    assert "### Per-stage breakdown" in report
    header = _table_rows(report, "| receive |")[0]
    assert header.index("receive") < header.index("stage:denoise") < header.index("export")
    r = doc.result("e2e/ct-denoise/512x512x600/appliance-scu/c1/first_byte_to_last_response")
    rows = [row for row in _table_rows(report, "| 512×512×600 | appliance-scu | 1 |")
            if "/" in row and "`" not in row]
    assert len(rows) == 1
    st = r.stages["stage:denoise"]
    assert f"| {fmt(st.p50, 3)} / {fmt(st.p95, 3)} |" in rows[0]
    assert f"| {fmt(r.stats.p50, 3)} / {fmt(r.stats.p95, 3)} |" in rows[0]
    # one row per first-byte result (those carry the stages): 4 sizes x 2 senders + 2 x 2 concurrent
    assert len([row for row in _table_rows(report, " / ") if "`" not in row]) == 12


def _stage_figure(monkeypatch, results: list[Result]):
    """The e2e stage figure as drawn, before it is saved and closed."""
    figures = []
    monkeypatch.setattr(e2e_plots, "save", lambda fig, out_dir, key: figures.append(fig) or PLOT_FILES[key])
    e2e_plots.plot_stages(results, Path("unused"))
    (fig,) = figures
    return fig


def _stage_documents(stage_samples: bool) -> list[Result]:
    rng = np.random.default_rng(3)
    results: list[Result] = []
    for slices in (64, 300):
        for sender in SENDERS:
            results += _e2e(rng, slices, sender, 1, n=6, stage_samples=stage_samples)
    results += _e2e(rng, 300, "appliance-scu", 2, n=3, stage_samples=stage_samples)  # not the reference
    return results


def test_e2e_stage_plot_shows_the_distribution_of_stage_samples(monkeypatch, tmp_path):
    results = _stage_documents(stage_samples=True)
    fig = _stage_figure(monkeypatch, results)
    try:
        panels = [ax for ax in fig.axes if ax.get_visible()]
        assert [ax.get_title() for ax in panels] == [f"sender {s}" for s in SENDERS]
        assert "distribution" in fig.get_suptitle() and "1 concurrent study" in fig.get_suptitle()
        for ax, sender in zip(panels, SENDERS):
            reference = [r for r in results if r.stages and r.params["sender"] == sender
                         and r.params["concurrency"] == 1]
            assert not ax.containers, "bars drawn although every stage has its samples"
            assert [t.get_text() for t in ax.get_yticklabels()] == list(STAGES)
            assert "box quartiles, red median, whiskers min–max, points the samples" in ax.get_xlabel()
            # one box per (series size, stage), and every sample of the reference results as a point
            assert len(ax.patches) == len(reference) * len(STAGES)
            points = np.sort(np.concatenate([ln.get_xdata() for ln in ax.get_lines() if ln.get_marker() == "o"]))
            expected = np.sort(np.concatenate([r.stage_samples[s] for r in reference for s in STAGES]))
            np.testing.assert_allclose(points, expected, rtol=0, atol=1e-12)  # seconds, exactly as measured
            assert [t.get_text() for t in ax.get_legend().get_texts()] == ["512×512×64", "512×512×300"]
            # the shared axis starts at 0 s and no panel's slowest sample is cut off
            left, right = ax.get_xlim()
            slowest = max(max(v) for r in results if r.params["concurrency"] == 1 for v in r.stage_samples.values())
            assert left == 0 and right >= slowest
    finally:
        plt.close(fig)
    monkeypatch.undo()
    render_report(_document(results), tmp_path)
    _assert_png(tmp_path / PLOT_FILES["e2e_stages"])


def test_e2e_stage_plot_falls_back_to_p50_p95_bars_without_samples(monkeypatch):
    results = _stage_documents(stage_samples=False)  # a document from before stage_samples
    fig = _stage_figure(monkeypatch, results)
    try:
        panels = [ax for ax in fig.axes if ax.get_visible()]
        assert "p50 and p95" in fig.get_suptitle()
        for ax, sender in zip(panels, SENDERS):
            reference = [r for r in results if r.stages and r.params["sender"] == sender
                         and r.params["concurrency"] == 1]
            assert not [ln for ln in ax.get_lines() if ln.get_marker() == "o"]
            assert "bar p50, whisker p95" in ax.get_xlabel()
            bars = [c for c in ax.containers if isinstance(c, BarContainer)]
            assert len(bars) == len(reference)
            for bar, r in zip(bars, reference):
                widths = [p.get_width() for p in bar.patches]
                np.testing.assert_allclose(widths, [r.stages[s].p50 for s in STAGES], rtol=0, atol=1e-12)
    finally:
        plt.close(fig)


def test_ingest_bars_pair_the_peer_with_its_own_result(full):
    doc, _, _ = full
    groups, receivers, values, notes = ingest_bars([r for r in doc.results if r.scenario == "ingest"])
    assert groups == ["512×512×128", "512×512×300"]
    assert receivers == ["appliance", "dcmtk-storescp"]  # not a third bar for the peer's spelling
    assert values[("512×512×300", "dcmtk-storescp")].p50 == 410.0
    assert notes == {(g, "appliance"): "0.85× vs\ndcmtk storescp" for g in groups}


def test_all_plots_written_and_linked(full):
    _, out, report = full
    for name in PLOT_FILES.values():
        assert f"]({name})" in report, name
        _assert_png(out / name)
    assert "No plot" not in report
    assert (out / "report.md").exists()


def test_minimal_document_one_scenario_no_crash(tmp_path):
    r = _result("recon/host/fdk/64^3", "recon", [1.5], params={"backend": "host", "algorithm": "fdk", "n": 64})
    doc = _document([r], scenarios=["recon", "e2e"], skipped={"e2e": "dcmtk not installed"})
    (tmp_path / PLOT_FILES["kernels"]).write_bytes(b"stale")  # from an earlier render
    report = render_report(doc, tmp_path).read_text()
    assert "## Reconstruction (recon)" in report
    assert "| host | fdk | 64³ | 1 | 1.500 | 1.500 | 1.500 | 1.500 | 1.500 | s |" in report
    assert "## End to end" not in report and "## Ingest" not in report
    assert "- `e2e`: dcmtk not installed" in report
    assert "GPU | none" in report
    assert not list(tmp_path.glob("*.png"))  # recon has no plot; the stale one is gone
    assert "![" not in report


def test_quick_run_with_one_size_skips_scaling_plots(tmp_path):
    rng = np.random.default_rng(1)
    results = _e2e(rng, 16, "appliance-scu", 1, n=3)
    results.append(_result("denoise/onnxruntime/64x64x16", "denoise", [0.4, 0.41],
                           params={"backend": "onnxruntime", "slices": 16, "rows": 64, "cols": 64}))
    doc = _document(results, quick=True)
    report = render_report(doc, tmp_path, results_name="quick results.json").read_text()
    assert "**Quick run.**" in report
    assert "[quick results.json](<quick results.json>)" in report
    for key in ("e2e_stages", "e2e_stages_stacked", "e2e_samples"):
        _assert_png(tmp_path / PLOT_FILES[key])
    for key in ("e2e_slices", "e2e_concurrency", "denoise", "ingest", "kernels"):
        assert not (tmp_path / PLOT_FILES[key]).exists(), key
    assert "*No plot “Latency vs slices per series”: fewer than two series sizes" in report
    assert "*No plot “Latency vs concurrent studies”: no e2e results at more than one level" in report
    assert "*No plot “Denoise throughput vs volume size”: fewer than two volume sizes" in report


def test_odd_but_valid_documents_render(tmp_path):
    """Ids off the conventions, params missing or of odd types, a peer without its own result,
    a stage only some results have: the report still renders, saying what it knows."""
    results = [
        _result("e2e/custom-run", "e2e", [1.0, 2.0], stages={"receive": Stats.of([0.5, 0.6])}),
        _result("e2e/ct/512x512x32/appliance-scu/c2/first_byte_to_last_response", "e2e", [3.0, 3.5, 4.0, 5.0],
                params={"concurrency": "2"}, stages={"receive": Stats.of([1.0]), "export": Stats.of([0.1])}),
        _result("ingest/appliance/8x8x4/appliance-scu", "ingest", [100.0], metric="instances_per_s",
                unit="1/s", better="higher",
                peer=Peer(name="dcmtk-storescp", id="ingest/dcmtk-storescp/8x8x4/appliance-scu",
                          stats=Stats.of([200.0]), ratio=0.5)),
        _result("kernels/weird", "kernels", [0.0], metric="throughput", unit="GUPS", better="higher"),
        _result("denoise/x/1x1x1", "denoise", [0.0, 0.0]),
        _result("recon/|pipe|", "recon", [1e-7], params={"note": "a|b"}),
        _result("e2e/odd/1x1x1/x/c1/last_image_to_last_response", "e2e", [1.0],
                params={"concurrency": "many", "slices": "lots", "sender": None, "rows": [1, 2]}),
        _result("e2e/odd/1x1x2/x/c1/last_image_to_last_response", "e2e", [2.0], params={"concurrency": 1.0}),
    ]
    doc = _document(results, scenarios=list(SCENARIOS))
    report = render_report(doc, tmp_path).read_text()
    assert "drawing it failed" not in report
    assert "| e2e/custom-run |" in report or "`e2e/custom-run`" in report
    assert "0.50×" in report
    _, receivers, _, _ = ingest_bars([r for r in results if r.scenario == "ingest"])
    assert receivers == ["appliance", "dcmtk-storescp"]  # the peer's bar, named from its id
    assert "(n=1)" in report  # stage on fewer samples than the result
    assert "\\|pipe\\|" in report  # pipes in cells are escaped
    _assert_png(tmp_path / PLOT_FILES["ingest"])  # the peer's bar from the peer's stats
    _assert_png(tmp_path / PLOT_FILES["kernels"])


def test_main_writes_next_to_the_json(tmp_path, capsys):
    r = _result("kernels/host/forward_joseph/64^3", "kernels", [0.1, 0.12], metric="throughput", unit="GUPS",
                better="higher", params={"backend": "host", "operation": "forward_joseph", "n": 64})
    results = tmp_path / "run" / "results.json"
    results.parent.mkdir()
    results.write_text(_document([r]).dump())
    assert report_main([str(results)]) == 0
    report = results.parent / "report.md"
    assert capsys.readouterr().out.strip() == str(report)
    assert "[results.json](results.json)" in report.read_text()
    _assert_png(results.parent / PLOT_FILES["kernels"])
    out = tmp_path / "elsewhere"
    assert report_main([str(results), "--out", str(out)]) == 0
    assert "[../run/results.json](../run/results.json)" in (out / "report.md").read_text()
    assert json.loads(results.read_text())["schema"] == "appliance-bench/1"
