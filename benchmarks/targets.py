"""The speed and quality targets the benchmarks check, as data: (comparison, bound) per figure.

Ratios are taken side by side in one run (harness.side_by_side); see README.md here
for what each figure means and the history of the measured values.
"""

from __future__ import annotations

TARGETS: dict[str, dict[str, tuple[str, float]]] = {
    "serve": {
        "batching_on_64x1_vs_echo": (">=", 0.70),     # 64 clients x 1 row, batching on, vs Python gRPC's echo ceiling
        "rows256_vs_in_process_ort": (">=", 0.70),    # 256-row requests vs ONNX Runtime in-process
        "p99_ms_8_clients": ("<=", 10.0),             # 1-row Encode at 8 clients
    },
    "workers": {
        "workers_n_vs_1_64x1_h2load": (">=", 1.0),     # 2-core machine: --workers 2 no slower than 1 (h2load clients)
        "rows8x256_vs_in_process": (">=", 0.60),       # CUDA, 16 cores: 8 clients x 256 rows vs in-process ORT CUDA
        "rows16x4096_vs_in_process": (">=", 0.60),     # CUDA: 16 clients x 4096 rows
        "req_s_64x1": (">=", 15000.0),                 # CUDA: 64 clients x 1 row, requests/s
        "p99_ms_8x1": ("<=", 3.0),                     # CUDA: 8 clients x 1 row, p99
    },
    "precision": {
        "int8_p_at_10_loss": ("<=", 0.005),            # fp32 P@10 minus int8 P@10, worst of the models measured
        "int8_sq_error_change": ("<=", 0.02),          # int8 test squared error over fp32's, minus 1, worst model
        "int8_vs_fp32_in_process_256": (">=", 2.5),    # in-process Encode rows/s at 256 rows, 2 threads
        "int8_vs_fp32_served_8x256": (">=", 2.0),      # through zspace serve, 8 clients x 256 rows
        "shm_share_8x256": (">=", 0.9),                # zspace.v1 shared tensors, served / in-process ORT
        "shm_share_16x4096": (">=", 0.8),
        "zspace_client_share_8x256": (">=", 0.9),      # the Python ZSpaceClient (shared memory by itself)
        "zspace_client_share_16x4096": (">=", 0.8),
        "triton_shm_share_8x256": (">=", 0.9),         # tritonclient with system shared memory
        "triton_shm_share_16x4096": (">=", 0.8),
    },
    "retrieval": {
        "mnist_ae_precision@10": (">=", 0.97),         # 30-d AE codes, test -> train, same digit = relevant
        "news_ae10_beats_lsa10": (">", 0.0),           # 10-d AE codes vs 10-d LSA, smallest margin at 1/10/100
        "hnsw_recall@10": (">=", 0.98),                # HNSW32 against exact search
        "hnsw_vs_flat_single_query": (">=", 10.0),     # single-query rate, HNSW32 / Flat
        "service_search_p99_ms_8_clients": ("<=", 5.0),  # Search through `zspace serve`, 60k HNSW32 index
    },
    "mnist_2006": {
        "ae_test_sq_error": ("<=", 3.00),              # Hinton & Salakhutdinov 2006: 784-1000-500-250-30, 3.00
        "ae_beats_pca": ("<", 0.0),                    # AE error minus PCA-30 error (the paper: 13.87)
    },
}

OPS = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, "<": lambda a, b: a < b}


def check(benchmark: str, values: dict[str, float], notes: dict[str, str] | None = None) -> dict:
    """Each target of `benchmark` with its measured value and whether it is met; printed as it goes."""
    out = {}
    for name, (op, bound) in TARGETS[benchmark].items():
        if name not in values:
            continue
        met = bool(OPS[op](values[name], bound))
        out[name] = {"value": values[name], "target": f"{op} {bound:g}", "met": met, **({"how": notes[name]} if notes and name in notes else {})}
        print(f"{name}: {values[name]:.4g} (target {op} {bound:g}): {'met' if met else 'NOT met'}", flush=True)
    return out
