"""One learner step under torch's profiler (rl/learner/profiling.py): the summary's pure parts,
and a real step of the FSDP2 learner on Ray with the tiny Llama."""
from __future__ import annotations

import pytest

from rl.learner.group import LearnerGroup
from test_learner import LORA, make_batch, make_cfg  # pytest puts tests/ on the path


def test_kernel_classes_and_summary_shares():
    from rl.learner.profiling import kernel_class, summarize

    assert kernel_class("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "matmul"
    assert kernel_class("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits>") == "attention"
    assert kernel_class("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add>") == "elementwise"
    assert kernel_class("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<adam>") == "optimizer"
    assert kernel_class("Memcpy HtoD (Pageable -> Device)") == "copy"
    assert kernel_class("ncclDevKernel_AllGather_RING_LL") == "collective"
    assert kernel_class("some_custom_kernel") == "other"
    rows = [("gemm_a", 10, 0.0, 0.6, True), ("elementwise_kernel", 100, 0.0, 0.2, True),
            ("aten::mm", 10, 0.05, 0.0, False), ("aten::add", 100, 0.10, 0.0, False)]
    s = summarize(rows, wall_s=1.0)
    assert s["device_busy_s"] == 0.8 and s["device_busy_share"] == 0.8 and s["kernel_launches"] == 110
    assert s["by_class"] == {"matmul": 0.6, "elementwise": 0.2}
    assert [k["name"] for k in s["top_kernels"]] == ["gemm_a", "elementwise_kernel"]
    assert [o["name"] for o in s["top_host_ops"]] == ["aten::add", "aten::mm"]
    assert summarize(rows[2:], wall_s=1.0)["device_busy_share"] is None  # no kernels: a CPU step


def test_profile_rows_leave_out_ranges_marked_on_the_gpu_timeline():
    from types import SimpleNamespace as Event

    from rl.learner.profiling import profile_rows

    kernel = Event(key="gemm", count=2, self_cpu_time_total=0.0, self_device_time_total=300.0,
                   device_type="DeviceType.CUDA", is_user_annotation=False)
    # FSDP2 marks its pre-forward on the GPU timeline: its time is the kernels' inside it.
    marked = Event(key="FSDP::pre_forward (layers.0)", count=8, self_cpu_time_total=0.0,
                   self_device_time_total=900.0, device_type="DeviceType.CUDA", is_user_annotation=True)
    op = Event(key="aten::mm", count=2, self_cpu_time_total=50.0, self_device_time_total=0.0,
               device_type="DeviceType.CPU", is_user_annotation=False)
    hook = Event(key="FSDP::pre_forward (layers.0)", count=8, self_cpu_time_total=20.0, self_device_time_total=0.0,
                 device_type="DeviceType.CPU", is_user_annotation=True)  # the hook's own Python time
    assert profile_rows([kernel, marked, op, hook]) == [
        ("gemm", 2, 0.0, 0.0003, True), ("aten::mm", 2, 0.00005, 0.0, False),
        ("FSDP::pre_forward (layers.0)", 8, 0.00002, 0.0, False)]


@pytest.mark.slow
def test_profile_step_writes_each_ranks_summary_of_that_step_only(ray_local, tiny_model_path, tmp_path):
    import json

    cfg = make_cfg(tiny_model_path, learner={"num_ranks": 2, "micro_batch_size": 4, "profile_step": 2,
                                             "profile_dir": str(tmp_path)})
    group = LearnerGroup(cfg, tiny_model_path, LORA)
    try:
        group.train_step(make_batch(8, seed=1))
        assert not list(tmp_path.iterdir())
        group.train_step(make_batch(8, seed=2))
        files = [f"learner-step-2-rank-{r}.{ext}" for r in (0, 1) for ext in ("json", "txt")]
        for rank in (0, 1):
            summary = json.loads((tmp_path / f"learner-step-2-rank-{rank}.json").read_text())
            assert summary["step"] == 2 and summary["rank"] == rank and summary["wall_s"] > 0
            ops = {o["name"] for o in summary["top_host_ops"]}
            assert ops & {"aten::mm", "aten::addmm", "aten::bmm", "aten::linear"}, ops
            assert "Self CPU" in (tmp_path / f"learner-step-2-rank-{rank}.txt").read_text()
        group.train_step(make_batch(8, seed=3))
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files)
    finally:
        group.shutdown()
