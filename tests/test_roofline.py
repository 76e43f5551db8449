"""The bench report's roofline model: the FLOP counts each design's structure implies, at the
configurations the issue and the peers quote, and that the report keeps the model apart from
measurements (GPU sizes without a GPU run: model cells filled, measured cells empty)."""
import pytest

from bench import registry, report

LIGER = registry.SIZES["liger"]  # N up to 8192, Hs 2048, Ht 4096, V 128,256, bf16
F = 2 * 8192 * 128256


def test_chunked_design_at_ligers_config_is_the_flop_floor():
    flops, hbm, floor, why = report.design_roofline("chunked", registry.CASES["jsd"], LIGER, 8192, reduced=True)
    assert flops == F * (3 * 2048 + 4096)
    assert flops == pytest.approx(21.5e12, rel=0.01)
    assert floor == pytest.approx(27.2e-3, rel=0.01)  # compute-bound: 21.5 TFLOP at 790 TFLOP/s
    assert hbm / report.PEAK_BYTES < floor
    assert why.startswith("F·(3·Hs + Ht)")


def test_per_token_log_probs_recompute_the_student_only():
    flops, *_ = report.design_roofline("chunked", registry.CASES["dpo"], LIGER, 8192, reduced=True)
    assert flops == F * 4 * 2048  # DPO is never reduced: the backward recomputes the student chunk
    flops, *_ = report.design_roofline("chunked", registry.CASES["logprobs"], LIGER, 8192, reduced=True)
    assert flops == F * 3 * 2048


def test_tile_fused_and_peers():
    jsd, kl = registry.CASES["jsd"], registry.CASES["forward_kl"]
    assert report.design_roofline("tile-fused", kl, LIGER, 8192, reduced=True)[0] == F * (4 * 2048 + 2 * 4096)
    assert report.design_roofline("tile-fused", jsd, LIGER, 8192, reduced=True)[0] == F * (5 * 2048 + 3 * 4096)
    assert report.design_roofline("liger", kl, LIGER, 8192, reduced=True)[0] == F * (3 * 2048 + 4096)
    assert report.design_roofline("cce", registry.CASES["logprobs"], LIGER, 8192, reduced=True)[0] == F * 4 * 2048
    naive = report.design_roofline("naive", kl, LIGER, 8192, reduced=True)
    assert naive[1] > 20 * report.design_roofline("tile-fused", kl, LIGER, 8192, reduced=True)[1]  # N×V fp32 traffic
    advantage = report.design_roofline("chunked", registry.CASES["advantage"], LIGER, 8192, reduced=True)
    assert advantage[0] == F * (3 * 2048 + 2 * 4096)  # teacher and reference heads


def test_model_cells_only_for_gpu_sizes_and_measured_cells_stay_empty():
    lines = report.kernel_section({})
    gpu_rows = [line for line in lines if line.startswith("| liger | 8192 |")]
    assert gpu_rows, "GPU sizes are listed without a GPU run"
    for line in gpu_rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[6] == "not run (needs CUDA)" and cells[7:11] == ["", "", "", ""]
        assert cells[11].endswith(" T") and cells[13].endswith("ms")
    assert not any(line.startswith("| cpu-anchor |") for line in lines), "CPU sizes without results stay out"
    assert any(line.startswith("## Roofline model") for line in lines)
