"""Operational carbon estimate of a run, after the M2Cache paper's model.

energy = sum over devices of (power x the seconds it is busy or powered for the run)
       + energy per byte moved on each edge (SSD -> DRAM, DRAM -> device)
grams  = energy in kWh x grid carbon intensity

Every constant is a named field of `CarbonModel` and can be overridden, e.g.
`CarbonModel.from_string("grid=400,cpu_w=45")`. The defaults are typical published figures, not
measurements of the machine at hand: treat the result as an estimate good to a factor of about two,
useful for comparing configurations on the same machine rather than as an absolute number.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from m2cache.errors import ConfigError

JOULES_PER_KWH = 3.6e6

# Nominal board power (TDP) by accelerator, from vendor spec sheets, matched as a substring of the
# lower-cased device name (e.g. torch.cuda.get_device_name(): "NVIDIA H200"). TDP is an upper
# bound: a GPU waiting on I/O draws less, so the GPU term over-estimates a stall-heavy run.
# Checked in order, so specific names come before generic ones.
GPU_NOMINAL_W: tuple[tuple[str, float], ...] = (
    ("h200", 700.0),       # H200 SXM
    ("h100 pcie", 350.0),
    ("h100", 700.0),       # H100 SXM
    ("a100", 400.0),       # A100 SXM (PCIe: 250-300 W)
    ("l40s", 350.0),
    ("l40", 300.0),
    ("l4", 72.0),
    ("a10", 150.0),
    ("t4", 70.0),
    ("v100", 300.0),
    ("4090", 450.0),
    ("3090", 350.0),
    ("cuda", 300.0),       # an unnamed CUDA device: a mid-range data-center card
    ("gpu", 300.0),
    ("cpu", 0.0),          # no accelerator: the "HBM" pool is host memory, already counted
)

EDGES = ("ssd_to_dram", "dram_to_hbm")
_ALIASES = {"grid": "grid_g_per_kwh"}


@dataclass(frozen=True, slots=True)
class CarbonEstimate:
    """The result: grams of CO2 per 1000 generated tokens, total joules, joules per component."""

    grams_per_1k_tokens: float
    joules: float
    grams: float
    breakdown: dict[str, float]


@dataclass(frozen=True, slots=True)
class CarbonModel:
    """The constants of the estimate; all overridable. Defaults are typical figures, not measured."""

    # Grid carbon intensity in gCO2/kWh. 820 is the figure the M2Cache paper used (a coal-heavy grid);
    # a European average is nearer 250-300, a hydro-heavy grid under 50.
    grid_g_per_kwh: float = 820.0
    # CPU package power over the run. 65 W is the TDP of a typical desktop-class CPU; the runtime's
    # actors, reader threads and (on CPU) compute keep the package awake for the whole run.
    cpu_w: float = 65.0
    # DRAM power per GB held powered, over the run: about 3 W per 8 GB DDR4/DDR5 DIMM under load.
    dram_w_per_gb: float = 0.375
    # GB of DRAM charged to the run. 16 GB is a typical desktop; set it to the DRAM budget, or to the
    # machine's DRAM to charge all of it.
    dram_gb: float = 16.0
    # Accelerator power over the run; None takes the nominal TDP of the device from GPU_NOMINAL_W.
    gpu_w: float | None = None
    # NVMe SSD active-read power (client PCIe Gen3/Gen4 drives list 4-8 W), charged over the drive's
    # busy time: bytes read / ssd_bytes_per_s. An idle drive is not charged to the run.
    ssd_w: float = 5.0
    # Sustained SSD read bandwidth, to turn bytes into busy seconds: 3 GB/s, a mid-range NVMe drive
    # (docs/architecture.md §7: 2.7-2.9 GB/s measured with O_DIRECT). 5 W / 3 GB/s is about 1.7 nJ/B.
    ssd_bytes_per_s: float = 3.0e9
    # Moving a bit from the SSD into DRAM (PCIe link plus the DRAM write): about 10 pJ/bit, the
    # order of magnitude of PCIe SerDes and DDR access energy.
    ssd_read_j_per_bit: float = 10e-12
    # Copying a bit from DRAM to the device (PCIe host-to-device, or a DRAM memcpy on a CPU device):
    # about 10 pJ/bit, same reasoning.
    copy_j_per_bit: float = 10e-12

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None and not value >= 0:
                raise ConfigError(f"carbon constant {f.name} must be >= 0, got {value}")
        if self.ssd_bytes_per_s <= 0:
            raise ConfigError(f"carbon constant ssd_bytes_per_s must be > 0, got "
                              f"{self.ssd_bytes_per_s}")

    @classmethod
    def keys(cls) -> list[str]:
        """The names `from_string` accepts: every field, plus the alias `grid`."""
        return sorted([f.name for f in dataclasses.fields(cls)] + list(_ALIASES))

    @classmethod
    def from_string(cls, spec: str) -> CarbonModel:
        """Build from `"key=value,key=value"` (e.g. `"grid=400,cpu_w=45"`); "" gives the defaults.

        `gpu_w=auto` (or `none`) restores the per-device nominal power. Raises ConfigError naming the
        valid keys for an unknown key, and for a value that is not a non-negative number.
        """
        overrides: dict[str, float | None] = {}
        for item in filter(None, (part.strip() for part in spec.split(","))):
            key, sep, raw = (s.strip() for s in item.partition("="))
            name = _ALIASES.get(key, key)
            if not sep or name not in {f.name for f in dataclasses.fields(cls)}:
                raise ConfigError(f"unknown carbon setting {item!r}; use key=value with key one of "
                                  f"{', '.join(cls.keys())}")
            if name == "gpu_w" and raw.lower() in ("auto", "none"):
                overrides[name] = None
                continue
            try:
                overrides[name] = float(raw)
            except ValueError:
                raise ConfigError(f"carbon setting {key} needs a number, got {raw!r}") from None
        return cls(**overrides)  # type: ignore[arg-type]

    def device_w(self, device: str) -> float:
        """Accelerator power for `device`: `gpu_w` if set, else the nominal TDP of its kind."""
        if self.gpu_w is not None:
            return self.gpu_w
        name = device.lower()
        for key, watts in GPU_NOMINAL_W:
            if key in name:
                return watts
        raise ConfigError(f"no nominal power known for device {device!r}; "
                          "set it with gpu_w=WATTS (e.g. --carbon gpu_w=300)")

    def estimate(self, seconds: float, tokens: int, bytes_by_edge: Mapping[str, int],
                 device: str) -> CarbonEstimate:
        """Estimate a run of `seconds` that generated `tokens` and moved `bytes_by_edge`
        (keys from EDGES; missing ones count as 0) on `device` ("cpu", "cuda", "NVIDIA H200"...)."""
        if seconds < 0 or tokens <= 0:
            raise ValueError(f"need seconds >= 0 and tokens > 0, got {seconds} s, {tokens} tokens")
        unknown = set(bytes_by_edge) - set(EDGES)
        if unknown:
            raise ValueError(f"unknown edges {sorted(unknown)}; known edges are {EDGES}")
        ssd_bytes = bytes_by_edge.get("ssd_to_dram", 0)
        copy_bytes = bytes_by_edge.get("dram_to_hbm", 0)
        ssd_busy_s = min(seconds, ssd_bytes / self.ssd_bytes_per_s)
        breakdown = {
            "cpu": self.cpu_w * seconds,
            "dram": self.dram_w_per_gb * self.dram_gb * seconds,
            "gpu": self.device_w(device) * seconds,
            "ssd": self.ssd_w * ssd_busy_s,
            "ssd_to_dram": ssd_bytes * 8 * self.ssd_read_j_per_bit,
            "dram_to_hbm": copy_bytes * 8 * self.copy_j_per_bit,
        }
        joules = sum(breakdown.values())
        grams = joules / JOULES_PER_KWH * self.grid_g_per_kwh
        return CarbonEstimate(grams_per_1k_tokens=grams * 1000 / tokens, joules=joules,
                              grams=grams, breakdown=breakdown)
