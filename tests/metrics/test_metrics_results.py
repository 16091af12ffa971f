"""The results table: a part file per append (local and object storage), reading, has_result, printing, plots."""

from __future__ import annotations

import pytest

ROW = {"checkpoint": "ck1", "run_id": "run-a", "backbone": "DiT-tiny", "autoencoder": "ae1", "store": "st1",
       "sampler": "euler", "sampling_steps": 50, "cfg_scale": 1.5, "num_samples": 64, "step": 100,
       "feature_extractor": "proxy-abc"}


@pytest.mark.parametrize("base", ["local", "memory"])
def test_metrics_results_append_read_has_result(base, tmp_path):
    from dcae15.metrics.results import append_results, has_result, read_results

    url = str(tmp_path / "results.parquet") if base == "local" else "memory://metrics-test/results.parquet"
    assert len(read_results(url)) == 0 and not has_result(url, run_id="run-a")
    p1 = append_results(url, [{**ROW, "proxy-fid": 3.5, "proxy-is": 2.0, "proxy-classifier_accuracy": 0.9}])
    p2 = append_results(url, [{**ROW, "step": 200, "metric": "proxy-fid", "value": 2.5}])
    assert p1 != p2 and p1.endswith(".parquet")  # each evaluation its own object: no read-modify-write
    t = read_results(url)
    assert len(t) == 4 and sorted(set(t["metric"])) == ["proxy-classifier_accuracy", "proxy-fid", "proxy-is"]
    assert has_result(url, checkpoint="ck1", metric="proxy-fid", sampler="euler", sampling_steps=50, cfg_scale=1.5,
                      num_samples=64, step=200)
    assert not has_result(url, checkpoint="ck1", metric="proxy-fid", step=300)
    assert not has_result(url, checkpoint="ck1", metric="fid")
    # the flows' pandas-like use: column == value masks
    hit = (t["run_id"] == "run-a") & (t["step"] == 100) & (t["feature_extractor"] == "proxy-abc")
    assert hit.sum() == 3
    if base == "memory":
        import fsspec

        fsspec.filesystem("memory").rm("/metrics-test", recursive=True)


def test_metrics_results_refuse_mixed_or_unnamed_numbers(tmp_path):
    from dcae15.metrics.results import append_results

    url = str(tmp_path / "r")
    with pytest.raises(ValueError, match="proxy-fid"):
        append_results(url, [{**ROW, "fid": 1.0}])  # a proxy number without the proxy- label
    with pytest.raises(ValueError, match="proxy feature extractor"):
        append_results(url, [{**ROW, "feature_extractor": "inception-v3-compat", "proxy-fid": 1.0}])
    with pytest.raises(ValueError, match="names no metric"):
        append_results(url, [{"run_id": "x"}])
    with pytest.raises(ValueError, match="unknown metric"):
        append_results(url, [{"metric": "bleu", "value": 1.0}])


def test_metrics_results_print_plot_cli(tmp_path, capsys):
    from dcae15.metrics.__main__ import main
    from dcae15.metrics.results import append_results, format_table, plot_results, read_results

    url = str(tmp_path / "results.parquet")
    for step, v in [(100, 3.0), (200, 2.0), (300, 1.5)]:
        append_results(url, [{**ROW, "step": step, "proxy-fid": v}])
        append_results(url, [{**ROW, "run_id": "run-b", "backbone": "UViT-tiny", "step": step, "proxy-fid": v + 1}])
    append_results(url, [{**ROW, "feature_extractor": "inception-v3-compat", "fid": 20.0}])
    text = format_table(read_results(url))
    assert "proxy-fid" in text and "inception-v3-compat" in text and "UViT-tiny" in text
    pngs = plot_results(url, str(tmp_path / "plots"))
    assert sorted(p.rsplit("/", 1)[-1] for p in pngs) == ["results-inception-v3-compat.png", "results-proxy-abc.png"]
    for p in pngs:
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert main(["results", url, "--metric", "fid", "--plot", str(tmp_path / "cli")]) == 0
    out = capsys.readouterr().out
    assert "20" in out and "proxy-fid" not in out.split("wrote")[0] and "results-proxy-abc.png" in out
    assert main(["nope"]) == 2


def test_metrics_results_protocols_never_share_a_plot_line(tmp_path, monkeypatch):
    """Rows of one run scored under two protocols (issue 31) are two lines, each labelled with its protocol; the
    protocol is a column of every row."""
    import matplotlib.axes

    from dcae15.metrics.results import append_results, plot_results, read_results

    url = str(tmp_path / "results")
    for protocol, fid in (("dc-gen", 2.0), ("adm", 2.5)):
        for step in (10, 20):
            append_results(url, [{"run_id": "r1", "backbone": "USiT-H", "step": step, "protocol": protocol,
                                  "feature_extractor": "inception-v3-compat", "fid": fid + step / 100}])
    assert sorted({r["protocol"] for r in read_results(url).rows()}) == ["adm", "dc-gen"]
    drawn = []
    real_plot = matplotlib.axes.Axes.plot

    def plot(self, x, y, *args, **kwargs):
        drawn.append((kwargs.get("label"), list(x), list(y)))
        return real_plot(self, x, y, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", plot)
    assert plot_results(url, str(tmp_path / "plots"))
    assert sorted(drawn) == [("USiT-H r1 [adm]", [10, 20], [2.6, 2.7]), ("USiT-H r1 [dc-gen]", [10, 20], [2.1, 2.2])]


def test_metrics_results_rows_without_a_protocol_count_as_the_legacy_formulas(tmp_path):
    """Rows written before rows recorded a protocol were computed by torch-fidelity's / the proxy's formulas: after
    an upgrade they still answer ``has_result`` for those protocols (no rescoring, no second row), not for others."""
    from dcae15.metrics.results import append_results, has_result

    url = str(tmp_path / "results")
    append_results(url, [{**ROW, "proxy-fid": 3.5}])  # no protocol column at all
    assert has_result(url, run_id="run-a", step=100, protocol="proxy")
    assert has_result(url, run_id="run-a", step=100, protocol="torch-fidelity")
    assert not has_result(url, run_id="run-a", step=100, protocol="adm")
    append_results(url, [{**ROW, "step": 200, "protocol": "dc-gen", "proxy-fid": 3.0}])
    assert has_result(url, run_id="run-a", step=200, protocol="dc-gen")
    assert not has_result(url, run_id="run-a", step=200, protocol="proxy")  # a recorded protocol is never legacy
