"""The weak-scaling model's arithmetic (tools/bench_scale.py): no timing, no processes."""

from __future__ import annotations

import math

import pytest



@pytest.fixture(scope="module")
def scale():
    from tools import bench_scale

    return bench_scale


NET = {"gpus_per_node": 8, "intra_busbw": 150e9, "intra_latency": 2e-6, "inter_busbw": 50e9, "inter_latency": 5e-6}
GPUS = [1, 2, 4, 8, 16, 32, 64, 128]


def test_ring_formulas(scale):
    mib = 2**20
    assert scale.ring_allreduce_s(100 * mib, 1, 1e9, 1e-3) == 0.0  # one rank exchanges nothing
    # 2 ranks, no latency: each sends half twice = the whole buffer once
    assert scale.ring_allreduce_s(1e9, 2, 1e9, 0.0) == pytest.approx(1.0)
    # 8 ranks: 2 x 7/8 of the bytes over the bus bandwidth, 14 latency steps
    assert scale.ring_allreduce_s(8e9, 8, 2e9, 1e-3) == pytest.approx(2 * 7 / 8 * 4 + 14e-3)
    # the bandwidth term tends to 2 x bytes / bw for many ranks and never reaches it
    assert scale.ring_allreduce_s(1e9, 1024, 1e9, 0.0) < 2.0
    assert scale.ring_allreduce_s(1e9, 1024, 1e9, 0.0) == pytest.approx(2.0, rel=1e-2)
    # reduce-scatter + all-gather move exactly what one all-reduce moves
    for n in (2, 8, 64):
        assert 2 * scale.ring_half_s(3e8, n, 5e10, 5e-6) == pytest.approx(scale.ring_allreduce_s(3e8, n, 5e10, 5e-6))


def test_buckets(scale):
    mib = 2**20
    sizes = [mib // 2] * 3 + [30 * mib] + [10 * mib] * 5
    out = scale.buckets(sizes, 25 * mib, 1 * mib)
    assert sum(out) == sum(sizes)
    assert out[0] <= mib  # the small first bucket
    assert 30 * mib in out  # a parameter above the cap goes alone
    assert all(b <= 25 * mib for b in out if b != 30 * mib)
    assert scale.buckets([], 25 * mib) == []


def test_exposed_bounds(scale):
    sizes = [10, 10, 10, 10]
    comm = [0.1, 0.1, 0.1, 0.1]
    # no backward to hide behind: everything is exposed
    assert scale.exposed_s(sizes, comm, 0.0) == pytest.approx(0.4)
    # a long backward hides all but the last bucket (ready when backward ends)
    assert scale.exposed_s(sizes, comm, 100.0) == pytest.approx(0.1)
    # communication longer than backward: only the excess is exposed (serial chain from the first ready time)
    assert scale.exposed_s(sizes, comm, 0.2) == pytest.approx(0.05 + 0.4 - 0.2)
    for backward in (0.0, 0.05, 0.3, 1.0):
        with_overlap = scale.exposed_s(sizes, comm, backward)
        without = scale.exposed_s(sizes, comm, backward, overlap=False)
        assert 0.1 - 1e-12 <= with_overlap <= without == pytest.approx(0.4)


def test_efficiency_shape(scale):
    params = [4 * 2**20] * 300  # 1.2 GiB of fp32 gradients, tiny-sd's order of size
    step, backward = 0.37, 0.22
    for overlap in (True, False):
        ddp = [scale.predict_ddp(n, step, backward, params, NET, overlap=overlap)["efficiency"] for n in GPUS]
        assert ddp[0] == 1.0
        assert all(b <= a for a, b in zip(ddp, ddp[1:]))
        assert ddp[-1] < 1.0
    zero = [scale.predict_zero2(n, step, backward, [p // 2 for p in params], NET, 10**8, 10**8)["efficiency"]
            for n in GPUS]
    assert zero[0] == 1.0 and all(b <= a for a, b in zip(zero, zero[1:])) and zero[-1] < 1.0
    for n in GPUS[1:]:
        with_overlap = scale.predict_ddp(n, step, backward, params, NET)
        without = scale.predict_ddp(n, step, backward, params, NET, overlap=False)
        assert with_overlap["efficiency"] > without["efficiency"]
        assert without["exposed_s"] == pytest.approx(without["comm_s"])
    # crossing nodes (n > 8) costs more than staying in one (slower links)
    assert (scale.predict_ddp(16, step, 0.0, params, NET)["exposed_s"] >
            2 * scale.predict_ddp(8, step, 0.0, params, NET)["exposed_s"])


def test_fit_line_recovers_latency_and_bandwidth(scale):
    sizes = [2.0**k for k in range(12, 27, 2)]
    seconds = [250e-6 + x / 1.5e9 for x in sizes]
    latency, bandwidth = scale.fit_line(sizes, seconds)
    assert latency == pytest.approx(250e-6, rel=0.2)  # the small sizes carry a little bandwidth time too
    assert bandwidth == pytest.approx(1.5e9, rel=0.05)


def test_tiny_sd_parameter_count(scale):
    params = scale.fad_parameters("tiny-sd", 64)
    count = sum(p.numel() for p in params)
    # BK-SDM-Tiny with 1-channel conv_in/out 323,367,681 (docs/facts.md) + a 9 x 1280 class embedding,
    # + the 9 x 1 x 768 token table + the seed projector Linear(2048, 1280)
    assert count == 323_367_681 + 9 * 1280 + 9 * 768 + 2048 * 1280 + 1280
    assert not math.isnan(sum(scale.grad_order_bytes(params, 4)))
