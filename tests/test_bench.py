"""The throughput benchmark's machinery on the CPU at tiny sizes (``bench --device cpu --small``),
transformers' comparison included where it is installed."""
import argparse
import json

from kcache_ops.cli import bench


def test_bench_small_on_cpu(tmp_path):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    bench.run(parser.parse_args(["--device", "cpu", "--small", "--steps", "2", "--out",
                                 str(tmp_path)]))
    data = json.loads((tmp_path / "bench.json").read_text())
    rows = {(r["context"], r["backend"]): r for r in data["rows"]}
    assert data["small"] and rows
    for (context, backend), r in rows.items():
        assert r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0
        if backend == "kcache":
            assert r["host_bytes"] > 0 and r["pcie_bytes_per_step"] > 0
            dense = rows.get((context, "dense"))
            if dense:  # K only on the device: at least as many sequences fit the same budget
                assert r["batch"] >= dense["batch"] and r["cache_device_bytes"] <= r["budget_bytes"]
        else:
            assert r["host_bytes"] == 0
            assert "hf_decode_tok_s" in r or "transformers" not in data["machine"]
    assert (tmp_path / "bench_throughput.png").is_file()
    assert "Throughput" in (tmp_path / "REPORT.md").read_text()
