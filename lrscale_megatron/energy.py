"""GPU energy from NVML's cumulative energy counters, or an explicit "unavailable".

``nvmlDeviceGetTotalEnergyConsumption`` returns the energy (millijoules) a device has used since the
driver loaded (Volta and newer). A measurement is the sum over devices of the counter's change
between :meth:`EnergyMeter.start` and :meth:`EnergyMeter.read`/:meth:`EnergyMeter.stop`, converted to joules.

When NVML cannot answer -- no ``pynvml`` module, no driver (``NVMLError_LibraryNotFound``), a GPU
without the counter (``NVMLError_NotSupported``), any other NVML error, or a counter that went
backwards (driver reload) -- the reading says ``available=False`` with ``energy_j=None`` and a reason.
It never reports 0 J for "not measured".

Usage::

    with EnergyMeter() as meter:
        train_steps()
    log(meter.reading.energy_j)  # None when unavailable

NVML numbers devices in its own order and ignores ``CUDA_VISIBLE_DEVICES``; pass ``device_indices``
(NVML indices) to meter only this process's GPU. The default meters every GPU on the node.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType, TracebackType
from typing import Any

logger = logging.getLogger(__name__)

_COUNTER_MODULUS = 2**64  # the counter is an unsigned long long
MAX_PLAUSIBLE_POWER_W = 10_000.0
"""A wrapped counter is accepted only if the implied mean power per device is below this."""


@dataclass(frozen=True)
class EnergyReading:
    """Energy used since :meth:`EnergyMeter.start`.

    Attributes:
        available: whether NVML measured every metered device.
        energy_j: total joules over the devices, ``None`` when not available.
        per_device_j: joules per device (order of ``device_indices``), ``None`` when not available.
        elapsed_s: wall-clock seconds since ``start``.
        reason: why the energy is unavailable, ``None`` when available.
    """

    available: bool
    energy_j: float | None
    per_device_j: tuple[float, ...] | None
    elapsed_s: float
    reason: str | None = None

    @property
    def mean_power_w(self) -> float | None:
        if self.energy_j is None or self.elapsed_s <= 0:
            return None
        return self.energy_j / self.elapsed_s


def _import_pynvml() -> ModuleType:
    import pynvml

    return pynvml


def _is_nvml_error(pynvml: Any, exc: BaseException) -> bool:
    error_type = getattr(pynvml, "NVMLError", None)
    return isinstance(error_type, type) and isinstance(exc, error_type)


class EnergyMeter:
    """Start/stop (or context-manager) meter over NVML energy counters.

    Args:
        device_indices: NVML device indices to meter; ``None`` for all devices.
    """

    def __init__(self, device_indices: Sequence[int] | None = None) -> None:
        self.device_indices: tuple[int, ...] | None = (
            tuple(device_indices) if device_indices is not None else None
        )
        self.reading: EnergyReading | None = None
        self._pynvml: Any = None
        self._handles: list[Any] = []
        self._start_mj: list[int] = []
        self._t0: float | None = None
        self._unavailable: str | None = None
        self._started = False

    @property
    def available(self) -> bool:
        """Whether the last ``start`` reached every device's energy counter (``False`` before ``start``)."""
        return self._started and self._unavailable is None

    def start(self) -> EnergyMeter:
        """Record each device's counter now (re-starting discards an unfinished measurement)."""
        self._shutdown()
        self.reading = None
        self._unavailable = None
        self._handles, self._start_mj = [], []
        self._t0 = time.perf_counter()
        self._started = True
        try:
            pynvml = _import_pynvml()
        except ImportError as exc:
            self._unavailable = f"pynvml is not importable ({exc}); install nvidia-ml-py"
            logger.info("energy unavailable: %s", self._unavailable)
            return self
        try:
            pynvml.nvmlInit()
        except Exception as exc:
            if not _is_nvml_error(pynvml, exc):
                raise
            self._unavailable = f"nvmlInit failed: {type(exc).__name__}: {exc}"
            logger.info("energy unavailable: %s", self._unavailable)
            return self
        self._pynvml = pynvml
        try:
            indices = self.device_indices
            if indices is None:
                indices = tuple(range(pynvml.nvmlDeviceGetCount()))
            if not indices:
                raise _NoDevices("NVML reports no devices")
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in indices]
            self._start_mj = [int(pynvml.nvmlDeviceGetTotalEnergyConsumption(h)) for h in self._handles]
            self.device_indices = tuple(indices)
        except Exception as exc:
            if not (_is_nvml_error(pynvml, exc) or isinstance(exc, _NoDevices)):
                self._shutdown()
                raise
            self._unavailable = f"energy counter unreadable: {type(exc).__name__}: {exc}"
            logger.info("energy unavailable: %s", self._unavailable)
            self._shutdown()
        return self

    def read(self) -> EnergyReading:
        """Energy since ``start``, without stopping."""
        if self._t0 is None:
            raise RuntimeError("EnergyMeter.read() before start()")
        elapsed = time.perf_counter() - self._t0
        if self._unavailable is not None:
            return EnergyReading(False, None, None, elapsed, self._unavailable)
        per_device: list[float] = []
        for index, handle, start in zip(self.device_indices or (), self._handles, self._start_mj):
            try:
                now = int(self._pynvml.nvmlDeviceGetTotalEnergyConsumption(handle))
            except Exception as exc:
                if not _is_nvml_error(self._pynvml, exc):
                    raise
                reason = f"device {index}: energy counter unreadable: {type(exc).__name__}: {exc}"
                return EnergyReading(False, None, None, elapsed, reason)
            delta_mj = now - start
            if delta_mj < 0:
                # 1. a 64-bit wrap gives a small positive delta modulo 2**64; 2. a reset (driver
                # reload) gives an implausibly large one: report it as unmeasured, not as a number.
                delta_mj += _COUNTER_MODULUS
                if delta_mj > MAX_PLAUSIBLE_POWER_W * max(elapsed, 1e-3) * 1e3:
                    reason = f"device {index}: energy counter went backwards ({start} -> {now} mJ); reset?"
                    return EnergyReading(False, None, None, elapsed, reason)
            per_device.append(delta_mj / 1e3)
        return EnergyReading(True, float(sum(per_device)), tuple(per_device), elapsed, None)

    def stop(self) -> EnergyReading:
        """Energy since ``start``; releases NVML. Also stored in :attr:`reading`."""
        self.reading = self.read()
        self._shutdown()
        self._t0 = None
        return self.reading

    def _shutdown(self) -> None:
        if self._pynvml is not None:
            try:
                self._pynvml.nvmlShutdown()
            except Exception as exc:
                if not _is_nvml_error(self._pynvml, exc):
                    raise
            self._pynvml = None

    def __enter__(self) -> EnergyMeter:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class _NoDevices(Exception):
    pass
