"""The run report: the rank heatmap PNG and the Table-4 summary, from plain data."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.image import imread

from alora_ds.report.summary import plot_rank_heatmap, rank_matrix, split_module_name, summarize_run

TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PARENT = {t: "self_attn" if t in TYPES[:4] else "mlp" for t in TYPES}


def name(layer: int, kind: str) -> str:
    return f"model.layers.{layer}.{PARENT[kind]}.{kind}"


def rank_map(layers: int = 3) -> dict[str, int]:
    # A deterministic pattern: rank = layer + 2 * type index (so every cell differs).
    return {name(layer, t): layer + 2 * i for layer in range(layers) for i, t in enumerate(TYPES)}


def test_matrix_puts_every_rank_in_its_cell():
    ranks = rank_map()
    types, layers, matrix = rank_matrix(
        dict(reversed(list(ranks.items())))
    )  # order does not matter
    assert types == list(TYPES) and layers == [0, 1, 2]
    for i, kind in enumerate(TYPES):
        for layer in layers:
            assert matrix[i, layer] == ranks[name(layer, kind)]
    # A module type missing in a layer (not adapted there) is -1, and drawn blank.
    del ranks[name(1, "k_proj")]
    _, _, matrix = rank_matrix(ranks)
    assert matrix[1, 1] == -1


def test_heatmap_png_decodes(tmp_path):
    ranks = rank_map(32)
    ranks[name(5, "up_proj")] = 0  # a module pruned to nothing is still drawn
    path = plot_rank_heatmap(ranks, tmp_path / "sub" / "ranks.png", title="LLaMA-2 7B, SST-2")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = imread(path)
    height, width, channels = pixels.shape
    assert channels in (3, 4) and width > height > 100  # 32 layers across, 7 types down
    assert np.std(pixels[..., :3]) > 0.05  # not a blank image


def test_bad_module_names_are_refused():
    assert split_module_name("model.layers.3.mlp.up_proj") == (3, "up_proj")
    with pytest.raises(ValueError, match=r"module name 'lm_head' has no '.layers.<index>.' part"):
        rank_matrix({"lm_head": 4})
    with pytest.raises(ValueError, match="the rank map is empty"):
        rank_matrix({})
    with pytest.raises(ValueError, match=r"two modules of type 'q_proj' in layer 0"):
        rank_matrix({"model.layers.0.self_attn.q_proj": 1, "model.layers.0.other.q_proj": 2})


def test_summary_numbers_match_the_input():
    initial = {name(layer, t): 8 for layer in range(2) for t in TYPES}  # 14 modules x 8
    final = dict(initial)
    final[name(0, "q_proj")] = 5  # lost 3
    final[name(1, "k_proj")] = 4  # lost 4
    final[name(0, "up_proj")] = 11  # gained 3
    # in + out features per rank: attention 64 + 64, MLP 64 + 128
    per_rank = {n: 128 if n.split(".")[-2] == "self_attn" else 192 for n in initial}
    summary = summarize_run(
        initial_ranks=initial, final_ranks=final, params_per_rank=per_rank,
        peak_memory_bytes=[18_100_000_000, 17_900_000_000], wall_time_s=7200.0, tokens=36_000_000,
    )  # fmt: skip
    assert summary.total_ranks_start == 112 and summary.total_ranks_end == 108
    assert summary.adapter_params_start == 8 * (8 * 128 + 6 * 192)  # 8 attention, 6 MLP modules
    assert summary.adapter_params_end == summary.adapter_params_start - 3 * 128 - 4 * 128 + 3 * 192
    q = summary.ranks_by_type["q_proj"]
    assert (q.total, q.mean, q.min, q.max) == (13, 6.5, 5, 8)
    assert summary.ranks_by_type["up_proj"].max == 11
    assert list(summary.ranks_by_type) == list(TYPES)
    assert summary.tokens_per_s == 5000.0

    data = summary.to_dict()
    assert data["peak_memory_bytes"] == [18_100_000_000, 17_900_000_000]
    assert data["ranks_by_type"]["k_proj"] == {"total": 12, "mean": 6.0, "min": 4, "max": 8}
    text = summary.to_text()
    assert "ranks: 112 at start, 108 at end" in text
    assert f"adapter parameters: {summary.adapter_params_start:,} at start" in text
    assert "peak memory per process (GB): 18.10, 17.90" in text
    assert "wall time: 2.00 h (7200.0 s)" in text and "tokens per second: 5000.0" in text
    assert "  q_proj         13    6.50     5     8" in text


def test_summary_refuses_what_it_cannot_count():
    ranks = {name(0, "q_proj"): 2}
    with pytest.raises(
        ValueError,
        match=r"no parameter count per rank for modules \['model.layers.0.self_attn.q_proj'\]",
    ):
        summarize_run(initial_ranks=ranks, final_ranks=ranks, params_per_rank={},
                      peak_memory_bytes=[1], wall_time_s=1.0, tokens=1)  # fmt: skip
    with pytest.raises(ValueError, match="wall_time_s must be positive, got 0"):
        summarize_run(initial_ranks=ranks, final_ranks=ranks, params_per_rank={next(iter(ranks)): 1},
                      peak_memory_bytes=[1], wall_time_s=0, tokens=1)  # fmt: skip
