"""bench/report.py's per-op breakdown of a profiled step (the table BENCHMARKS.md shows above each profile)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_REPORT = Path(__file__).resolve().parents[1] / "bench" / "report.py"

# rows of a real profile table (H200, 8B step, run 20261129T010624Z), as torch.profiler prints them
TABLE = """\
NVIDIA H200, run X (velotune abc, peer velotune, gc unsloth), median step 356.1 ms; profiled: the first timed step
--------------------------------------------------------------------------------  ------------  ------------
                                                                            Name    Self CPU %      Self CPU   CPU total %     CPU total  CPU time avg     Self CUDA   Self CUDA %    CUDA total  CUDA time avg    # of Calls  
                                                                  _StackFunction         0.69%       2.955ms         1.95%       8.350ms       8.350ms     105.396ms        28.09%     124.977ms     124.977ms             1  
                                  nvjet_sm90_tst_320x128_64x3_1x2_h_bz_coopB_TNT         0.00%       0.000us         0.00%       0.000us       0.000us      80.732ms        21.52%      80.732ms     630.716us           128  
                                                  Memcpy HtoD (Pinned -> Device)         0.00%       0.000us         0.00%       0.000us       0.000us      19.465ms         5.19%      19.465ms     608.266us            32  
                                                            _dequant_4bit_kernel         0.00%       0.000us         0.00%       0.000us       0.000us      18.986ms         5.06%      18.986ms      29.666us           640  
                                                                        aten::mm         0.16%     666.871us         0.24%       1.011ms      45.945us      11.955ms         3.19%      11.955ms     543.390us            22  
void at::native::vectorized_elementwise_kernel<8, at::native::bfloat16_copy_k...         0.00%       0.000us         0.00%       0.000us       0.000us       2.235ms         0.60%       2.235ms       1.702us          1313  
                                  nvjet_sm90_tst_32x64_64x16_1x2_h_bz_splitK_NTN         0.00%       0.000us         0.00%       0.000us       0.000us       1.448ms         0.39%       1.448ms      15.082us            96  
                                                      LinearCrossEntropyFunction         0.42%       1.796ms        24.16%     103.453ms     103.453ms     950.750us         0.25%      13.011ms      13.011ms             1  
--------------------------------------------------------------------------------  ------------  ------------
Self CPU time total: 428.124ms
Self CUDA time total: 375.161ms
"""


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("velotune_bench_report", _REPORT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_breakdown_groups_kernels_and_skips_op_rows(report):
    got = {g: (round(ms, 3), n) for g, ms, n in report.profile_breakdown(TABLE)}
    assert got == {
        "matmul (cuBLAS)": (80.732, 128),
        "host <-> device copies (copy engines: overlap the compute)": (19.465, 32),
        "NF4 dequantisation": (18.986, 640),
        "other kernels (elementwise, copies)": (2.235, 1313),
        "matmul (cuBLAS), calls under 60 us": (1.448, 96),
    }  # _StackFunction, aten::mm and LinearCrossEntropyFunction repeat their kernels' time: not counted


def test_breakdown_is_sorted_and_the_table_sums_compute_only(report):
    rows = report.profile_breakdown(TABLE)
    assert [ms for _, ms, _ in rows] == sorted((ms for _, ms, _ in rows), reverse=True)
    table = "\n".join(report._breakdown_table(TABLE))
    assert "**103.4**" in table  # 80.732 + 18.986 + 2.235 + 1.448: the copy engines' 19.5 ms overlap them
    assert "| median step (timed steps; the profiled step is one of them) | 356.1 |" in table


def test_units_and_a_table_without_kernel_rows(report):
    assert report._ms("1.5s") == 1500.0 and report._ms("250.000us") == 0.25 and report._ms("3ms") == 3.0
    assert report.profile_breakdown("Self CPU time total: 1ms\n") == []
    assert report._breakdown_table("nothing here") == []
