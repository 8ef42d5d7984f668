"""Every benchmark script runs in its tiny mode and writes valid JSON (so the scripts don't rot).
Nothing here is timing-based: only the shape of what the scripts report is checked."""

import json

import pytest

from bench import compare_trees, gpu, inference_latency, kmeans, loader, memory, ray_vs_plain, step_time, store_scale


def _run(module, tmp_path, *extra):
    path = tmp_path / "out.json"
    returned = module.main(["--tiny", "--json", str(path), *extra])
    written = json.loads(path.read_text())
    assert written["benchmark"] == returned["benchmark"]
    assert written["machine"]["versions"]["torch"] and written["wall_seconds"] > 0
    return written


def test_gpu(tmp_path):
    out = _run(gpu, tmp_path, "--device", "cpu")
    assert out["ops"]["graph_breaks"] == 0 and out["ops"]["total"] == out["ops"]["forward"] + out["ops"]["backward"]
    assert out["train"]["eager_fp32"]["step_ms"] > 0 and out["compile"]["compiled_fp32"]["compile_s"] > 0
    assert out["compile"]["compiled_bf16_channels_last"]["compiled_graphs"] >= 1  # cells of a kind share one
    assert out["train"]["divdr_over_dr_eager_fp32"] > 0
    trainer = out["trainer"]  # the pipeline's own step (train.cuda_graph needs a GPU: not on this machine)
    assert set(trainer) >= {"launched_bf16_channels_last", "launched_fp32"} and "cuda_graph_fp32" not in trainer
    assert all(trainer[name]["step_ms"] > 0 and trainer[name]["skipped_steps"] == 0 for name in
               ("launched_bf16_channels_last", "launched_fp32"))
    rows = out["inference"]["rows"]
    assert rows["all_open"]["flops_ratio"] == 1.0
    # the exported route costs its dynamic route's FLOPs minus the gates
    assert rows["closed_50_static"]["gflops"] < rows["closed_50_dynamic"]["gflops"]
    assert all("ms" in row for row in rows.values()), rows
    compiled = out["inference_compile"]["rows"]
    assert compiled["every_cell_dropped_static_compiled"]["compile_s"] > 0
    assert all("ms" in row for row in compiled.values()), compiled
    profiled = gpu.main(["--tiny", "--device", "cpu", "--sections", "profile"])["profile"]
    assert profiled["top"] and all(row["count"] > 0 for row in profiled["top"])
    # the backward's products come from autograd nodes; the forward's casts from the operation that cast
    chains = [row["chain"] for row in profiled["sources"]]
    assert any(c.startswith("aten::mul <- MulBackward0") for c in chains), chains
    assert all(row["count"] > 0 for row in profiled["sources"])
    assert "captured" not in profiled and "captured_streams" not in profiled  # a CUDA graph needs a GPU


def test_gpu_ab_puts_the_code_before_each_change_back():
    """bench/gpu_ab.py's "before" functions give what the current code gives (float32, the same network), so
    its rows differ in speed only; its sections run (tiny sizes, one round), train.fused_kernels' too."""
    import torch

    from bench import gpu_ab
    from divdr.config import get_model_config
    from divdr.heads import DynamicRoutingSegmenter

    torch.manual_seed(0)
    net = DynamicRoutingSegmenter(get_model_config("micro", num_classes=5)).train()
    images = torch.randn(2, 3, 64, 64)
    reference = net(images).logits
    for name, before in gpu_ab.before_contexts().items():
        with before():
            torch.testing.assert_close(net(images).logits, reference, rtol=1e-5, atol=1e-6, msg=name)
    out = gpu_ab.main(["--tiny", "--device", "cpu", "--rounds", "1"])
    assert set(out["changes"]) == {"gate_resize", "logits", "up_weight", "trainer_host"}
    assert all(row["before_ms"] > 0 and row["after_ms"] > 0 for row in out["changes"].values())
    assert len(out["upsample"]) == 5 and out["per_image_product"]["map_plus_map_us"] > 0
    # train.fused_kernels on a CPU: the kernels never apply, so the gradients are aten's exactly
    fused = out["fused"]
    assert fused["gradients"]["gradient_difference_fused_vs_aten"] == 0.0
    assert fused["gradients"]["loss_bf16_fused"] == fused["gradients"]["loss_bf16_aten"]
    assert set(fused) == {"gradients", "library", "library_streams", "pipeline", "pipeline_streams"}
    assert all(fused[name]["off_ms"] > 0 and fused[name]["on_ms"] > 0 for name in fused if name != "gradients")


def test_gpu_ab_keeps_the_other_sections_when_one_fails(monkeypatch):
    """One GPU call a session: a kernel that fails there (to compile, say) is recorded, and the rest still runs."""
    from bench import gpu_ab

    def broken(args):
        raise RuntimeError("no such kernel")

    monkeypatch.setattr(gpu_ab, "section_upsample", broken)
    monkeypatch.setattr(gpu_ab, "library_step_ms", lambda args, **options: 1.0)
    monkeypatch.setattr(gpu_ab, "trainer_step_ms", lambda args, *options: 1.0)
    out = gpu_ab.main(["--tiny", "--device", "cpu", "--rounds", "1", "--sections", "fused"])
    assert out["upsample"] == {"error": "RuntimeError: no such kernel"}
    assert out["per_image_product"]["map_plus_map_us"] > 0
    assert out["fused"]["library"]["on_ms"] == 1.0 and "changes" not in out


def test_gpu_ops_fused_section_counts_the_kernels_launched(tmp_path):
    """``ops_fused`` (triton's interpreter, set before the process starts): with train.fused_kernels fewer kernels
    per step, every Triton kernel launched as many times forward as backward; refused without the interpreter."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    root = Path(gpu.__file__).resolve().parents[1]
    out_file = tmp_path / "ops.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, str(root / "bench" / "gpu.py"), "--tiny", "--device", "cpu", "--sections",
                           "ops_fused", "--json", str(out_file)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = json.loads(out_file.read_text())["ops_fused"]
    default, fused = out["default"], out["fused"]
    assert default["triton"] == {} and default["kernels"] == default["launching"] > 0
    launched = fused["triton"]
    assert launched["residual_keep_forward"] == launched["residual_keep_backward"] > 0
    assert launched["bilinear_forward_nhwc"] > 0 and launched["scaled_sum_forward"] > 0
    assert fused["kernels"] < default["kernels"]
    refused = gpu.main(["--tiny", "--device", "cpu", "--sections", "ops_fused"])["ops_fused"]
    assert "TRITON_INTERPRET" in refused["error"]


def test_gpu_streams_section():
    """train.scale_streams changes nothing on a CPU: the gradients of both steps are equal; 150 s of budget leave
    out the compiled row (it asks for 200)."""
    out = gpu.main(["--tiny", "--device", "cpu", "--sections", "streams", "--budget", "150"])["streams"]
    for name in ("gradients_bf16_channels_last", "gradients_fp32"):
        assert out[name]["loss_one_stream"] == out[name]["loss_side_by_side"], out[name]
        assert out[name]["gradient_relative_difference"] == 0.0 and out[name]["gradients"] > 100
    assert all(out[name]["step_ms"] > 0 for name in ("library_bf16_channels_last", "library_bf16_channels_last_streams",
                                                      "baseline_library_eager_fp32", "trainer_bf16_channels_last",
                                                      "trainer_bf16_channels_last_streams"))
    assert out["trainer_compiled_bf16_channels_last_streams"] == {"skipped": "time budget spent"}


@pytest.mark.slow
def test_gpu_compile_cache_section():
    """Three processes, each its own inductor cache directory (a machine); --tiny compiles with aot_eager, which
    writes no cache, so only the rows' shape is checked here (the cache itself: tests/divdr/test_speed.py)."""
    out = gpu.main(["--tiny", "--device", "cpu", "--sections", "compile_cache"])["compile_cache"]
    rows = [out[name] for name, *_ in gpu.COMPILE_CACHE_ROWS]
    assert all(row["compile_s"] > 0 and row["compiled_graphs"] >= 1 for row in rows), out
    assert rows[0]["cache_bytes"] == 0 and rows[1]["cache_loaded"] is False  # aot_eager: nothing to write or load
    assert rows[0]["step_ms"] > 0 and "step_ms" not in rows[1]  # the compiled step timed once, cold


def test_compare_trees(tmp_path):
    from bench.common import REPO

    out = _run(compare_trees, tmp_path, "--before", str(REPO))  # this tree against itself
    assert set(out["cases"]) == set(compare_trees.TINY_CASES)
    assert all(case["median_ratio"] > 0 for case in out["cases"].values())


def test_kmeans(tmp_path):
    out = _run(kmeans, tmp_path)
    (row,) = out["rows"]
    assert row["faiss_s"] > 0 and row["sklearn_s"] > 0 and row["faiss_objective"] > 0
    assert row["sklearn_objective"] > 0


def test_inference_latency(tmp_path):
    out = _run(inference_latency, tmp_path)
    rows = {r["network"]: r for r in out["rows"]}
    assert rows["closed 0.00"]["flops_ratio"] == 1.0
    # closing every path leaves only the stem, the gates and the decoder
    assert rows["closed 1.00"]["gflops"] == pytest.approx(out["gflops_fixed"])
    assert "closed 0.50 [before]" in rows and "speedup_vs_before_b1" in rows["closed 0.50"]


def test_memory(tmp_path):
    out = _run(memory, tmp_path)
    (store,) = out["store"]
    assert store["buffer_mib"] > 0 and store["peak_mib"] >= store["after_imports_mib"]
    (worker,) = out["worker"]
    assert worker["peak_mib"] > worker["after_imports_mib"]


def test_loader(tmp_path):
    out = _run(loader, tmp_path)
    (setting,) = out["settings"].values()
    assert set(setting["images_per_s"]) == {"loader w0", "loader w1", "CPU step"}
    assert all(v["median"] > 0 for v in setting["images_per_s"].values())
    assert setting["loader_over_cpu_step"]["loader w0"]["median"] > 0 and setting["cores_for_h200_target"] > 0
    assert set(setting["stages_ms"]) >= {"decode image", "scaled crop+flip, normalised"}


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.ray
def test_step_time(tmp_path, ray_session):
    out = _run(step_time, tmp_path)
    assert set(out["step_seconds"]) == {"DR", "DR+store", "DivDR"}
    assert out["divdr_over_dr"]["median"] > 0 and out["streaming_overhead"]["median"] > 0
    assert out["kmeans_updates"]["DivDR"] >= 1 and out["store_ingested_rows"]["DivDR"] > 0


@pytest.mark.slow
@pytest.mark.ray
def test_ray_vs_plain(tmp_path, ray_session):
    out = _run(ray_vs_plain, tmp_path)
    assert out["images_per_s"]["ray"]["median"] > 0 and out["images_per_s"]["plain"]["median"] > 0
    assert out["ray_worker_peak_rss_mib"][0] > 0


@pytest.mark.slow
@pytest.mark.ray
def test_store_scale(tmp_path, ray_session):
    out = _run(store_scale, tmp_path)
    paced = out["paced"]
    assert paced["rows_ingested"] == paced["rows_expected"]
    assert len(paced["updates"]) >= 1 and out["flood"]["store_cpu_per_call_us"] > 0
    assert out["limits"] and out["in_process"]["intra_sampled_s"] > 0
