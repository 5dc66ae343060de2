"""Acceptance of the quantizers on the embedded model: KL divergence ordered by type, and an
importance matrix lowers it for the 2- and 3-bit types (benchmarks/quant_quality.py prints
the full table)."""

from __future__ import annotations

import pytest

from kvforge.quant.imatrix import write_imatrix
from kvforge.tools.perplexity import collect_imatrix, make_runner, perplexity, text_chunks
from kvforge.tools.quantize import quantize_file
from kvforge.tools.text import machine_text

pytestmark = pytest.mark.slow


def test_kld_order_and_imatrix_gain(tmp_path, smollm_path):
    source = tmp_path / "f32.gguf"
    quantize_file(smollm_path, source, "F32", show_progress=False)
    runner = make_runner(str(source))
    evaluation = text_chunks(runner, machine_text("evaluation"), 512, 6)
    calibration = text_chunks(runner, machine_text("calibration"), 512, 16)
    imatrix = tmp_path / "imatrix.gguf"
    sums, counts = collect_imatrix(runner, calibration, show_progress=False)
    write_imatrix(imatrix, sums, counts, ["stdlib"], len(calibration), 512)
    base = tmp_path / "base.logprobs"
    perplexity(runner, evaluation, save_base=base, show_progress=False)
    kld = {}
    for file_type in ("Q8_0", "Q4_K_M", "Q3_K_M", "Q2_K"):
        for use_imatrix in (False, True) if file_type in ("Q3_K_M", "Q2_K") else (False,):
            out = tmp_path / "q.gguf"
            quantize_file(
                source, out, file_type, imatrix if use_imatrix else None, show_progress=False
            )
            result = perplexity(
                make_runner(str(out)), evaluation, compare_base=base, show_progress=False
            )
            kld[(file_type, use_imatrix)] = result.kld
            print(
                f"{file_type} imatrix={use_imatrix}: KLD {result.kld:.4f} top-1 {result.top1:.4f}"
            )
    order = [kld[(t, False)] for t in ("Q8_0", "Q4_K_M", "Q3_K_M", "Q2_K")]
    assert order == sorted(order)
    assert kld[("Q8_0", False)] < 0.005
    for file_type in ("Q3_K_M", "Q2_K"):
        assert kld[(file_type, True)] < 0.9 * kld[(file_type, False)]
