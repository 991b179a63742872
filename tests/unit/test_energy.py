"""EnergyMeter: the real no-NVML path on this machine, and a fake pynvml for the measuring path."""

from __future__ import annotations

import sys
import types

import pytest

from lrscale_megatron import energy
from lrscale_megatron.energy import EnergyMeter


def test_unavailable_without_a_gpu_is_none_not_zero():
    try:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU; the unavailable path is tested with fakes below")
    except ImportError:
        pass
    with EnergyMeter() as meter:
        sum(range(1000))
    r = meter.reading
    assert r is not None and r.available is False and meter.available is False
    assert r.energy_j is None and r.per_device_j is None and r.mean_power_w is None
    assert r.reason and r.elapsed_s >= 0


class FakeNVMLError(Exception):
    pass


class FakeNotSupported(FakeNVMLError):
    pass


def fake_pynvml(counters: dict[int, list[int]], fail_init: bool = False) -> types.ModuleType:
    """A pynvml whose device i returns counters[i] (mJ) one after another; an exception is raised."""
    mod = types.ModuleType("pynvml")
    mod.NVMLError = FakeNVMLError  # type: ignore[attr-defined]
    mod.calls = {"init": 0, "shutdown": 0}  # type: ignore[attr-defined]

    def init():
        if fail_init:
            raise FakeNVMLError("Driver Not Loaded")
        mod.calls["init"] += 1  # type: ignore[attr-defined]

    def shutdown():
        mod.calls["shutdown"] += 1  # type: ignore[attr-defined]

    def energy_mj(handle):
        value = counters[handle].pop(0)
        if isinstance(value, Exception):
            raise value
        return value

    mod.nvmlInit = init  # type: ignore[attr-defined]
    mod.nvmlShutdown = shutdown  # type: ignore[attr-defined]
    mod.nvmlDeviceGetCount = lambda: len(counters)  # type: ignore[attr-defined]
    mod.nvmlDeviceGetHandleByIndex = lambda i: i  # type: ignore[attr-defined]
    mod.nvmlDeviceGetTotalEnergyConsumption = energy_mj  # type: ignore[attr-defined]
    return mod


def install(monkeypatch, mod):
    monkeypatch.setitem(sys.modules, "pynvml", mod)


def test_sums_deltas_over_devices_in_joules(monkeypatch):
    mod = fake_pynvml({0: [1_000_000, 1_250_500], 1: [7_000, 107_000]})
    install(monkeypatch, mod)
    with EnergyMeter() as meter:
        assert meter.available
    r = meter.reading
    assert r.available and r.reason is None
    assert r.per_device_j == pytest.approx((250.5, 100.0))
    assert r.energy_j == pytest.approx(350.5)
    assert mod.calls == {"init": 1, "shutdown": 1}


def test_read_without_stopping_then_stop(monkeypatch):
    install(monkeypatch, fake_pynvml({0: [0, 2_000, 5_000], 1: [10, 10, 10], 2: [0, 0, 0]}))
    meter = EnergyMeter(device_indices=[0]).start()
    assert meter.read().energy_j == pytest.approx(2.0)
    assert meter.stop().energy_j == pytest.approx(5.0)
    assert meter.device_indices == (0,)


def test_counter_wraparound_is_unwrapped(monkeypatch):
    install(monkeypatch, fake_pynvml({0: [2**64 - 500, 1_500]}))
    with EnergyMeter() as meter:
        pass
    assert meter.reading.available and meter.reading.energy_j == pytest.approx(2.0)


def test_counter_reset_is_unavailable_not_negative(monkeypatch):
    install(monkeypatch, fake_pynvml({0: [9_000_000_000, 5]}))
    with EnergyMeter() as meter:
        pass
    r = meter.reading
    assert not r.available and r.energy_j is None and "backwards" in r.reason


def test_error_mid_measurement_is_unavailable(monkeypatch):
    install(monkeypatch, fake_pynvml({0: [0, 10_000], 1: [0, FakeNVMLError("GPU is lost")]}))
    with EnergyMeter() as meter:
        pass
    r = meter.reading
    assert not r.available and r.energy_j is None and "GPU is lost" in r.reason


def test_unsupported_counter_and_failed_init_are_unavailable(monkeypatch):
    mod = fake_pynvml({0: [FakeNotSupported("Not Supported")]})
    install(monkeypatch, mod)
    with EnergyMeter() as meter:
        pass
    assert not meter.available and meter.reading.energy_j is None and "Not Supported" in meter.reading.reason
    assert mod.calls["shutdown"] == mod.calls["init"] == 1
    install(monkeypatch, fake_pynvml({0: [0, 1]}, fail_init=True))
    with EnergyMeter() as meter:
        pass
    assert meter.reading.energy_j is None and "Driver Not Loaded" in meter.reading.reason


def test_missing_pynvml_is_unavailable(monkeypatch):
    def no_pynvml():
        raise ImportError("No module named 'pynvml'")

    monkeypatch.setattr(energy, "_import_pynvml", no_pynvml)
    with EnergyMeter() as meter:
        pass
    assert meter.reading.energy_j is None and "nvidia-ml-py" in meter.reading.reason


def test_zero_devices_is_unavailable(monkeypatch):
    install(monkeypatch, fake_pynvml({}))
    with EnergyMeter() as meter:
        pass
    assert meter.reading.energy_j is None and "no devices" in meter.reading.reason


def test_read_before_start_is_an_error():
    with pytest.raises(RuntimeError, match="before start"):
        EnergyMeter().read()
