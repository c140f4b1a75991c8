"""What a multiplier costs in hardware: published figures only, each against its own source's exact multiplier.

SPEC section 7.  A figure is valid only against the exact multiplier of the same source,
technology and width, so a :class:`Cost` always carries both, and its relative area and
power are ratios within one source.  Relative figures of different sources may be set
side by side (each point keeps its source).  Where nothing is published, :func:`cost`
returns None: never a guess.

Sources: the MBM paper (Saadat et al., TCAD 2018, Table I: 8- and 16-bit integer MBM and
Mitchell, and the float32 designs as ratios to IEEE single precision), and EvoApproxLib's
headers (every circuit's own PDK45 figures, against the library's exact circuit of the
same width and signedness).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

from .evoapprox import circuit_for_digest
from .integer import generated_table
from .specs import Multiplier, MultiplierLike, as_multiplier

__all__ = ["Cost", "cost", "MBM_PAPER", "EVOAPPROX"]

MBM_PAPER = "Saadat et al., TCAD 2018, Table I (45 nm, 1 GHz)"
EVOAPPROX = "EvoApproxLib v2022 header (PDK45)"


@dataclasses.dataclass(frozen=True)
class Cost:
    """Published area/power/delay of ``design`` and of ``exact``, the same source's exact multiplier.

    Absolute figures are None where the source gives only ratios (the float32 designs);
    ``relative_area`` / ``relative_power`` are ``design / exact`` (1.0 = no saving); an area
    the source does not give is None.
    """

    design: str
    source: str
    width: str  # "8-bit unsigned", "float32", ...
    exact: str  # the source's exact multiplier of that width
    relative_area: Optional[float]
    relative_power: float
    area_um2: Optional[float] = None
    power_uw: Optional[float] = None
    delay_ns: Optional[float] = None
    exact_area_um2: Optional[float] = None
    exact_power_uw: Optional[float] = None
    exact_delay_ns: Optional[float] = None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _paper(design: str, width: str, area: float, power: float, exact_area: float, exact_power: float) -> Cost:
    return Cost(design, MBM_PAPER, width, "exact (Wallace)", area / exact_area, power / exact_power, area, power,
                None, exact_area, exact_power)


# SPEC section 7: the MBM paper's Table I (area um^2, power uW).
_PUBLISHED = {
    "mbm-int8": _paper("mbm-int8", "8-bit", 288.4, 21.6, 445.0, 35.3),
    "mitchell-int8": _paper("mitchell-int8", "8-bit", 221.6, 16.0, 445.0, 35.3),
    "mbm-int16": _paper("mbm-int16", "16-bit", 686.3, 47.9, 1900.9, 182.2),
    "mitchell-int16": _paper("mitchell-int16", "16-bit", 580.2, 40.4, 1900.9, 182.2),
    "mbm": Cost("mbm", MBM_PAPER, "float32", "IEEE single precision with rounding", 1 / 11.7, 1 / 16.1),
    "mitchell": Cost("mitchell", MBM_PAPER, "float32", "IEEE single precision with rounding", 1 / 13.6, 1 / 19.2),
}

# EvoApproxLib's exact circuits (MAE = 0) of each (width, signed), from their headers: name, area um^2, power mW,
# delay ns.
_EVOAPPROX_EXACT = {
    (7, False): ("mul7u_003", 536.4, 0.277, 1.20),
    (8, False): ("mul8u_1JJQ", 709.6, 0.391, 1.43),
    (8, True): ("mul8s_1KV6", 729.8, 0.425, 1.48),
    (11, False): ("mul11u_003", 1340.8, 0.930, 2.08),
    (12, False): ("mul12u_332", 1605.0, 1.157, 2.28),
    (12, True): ("mul12s_2PP", 1650.5, 1.210, 2.33),
    (16, False): ("mul16u_9DU", 3203.0, 2.202, 3.11),
    (16, True): ("mul16s_HG4", 2614.0, 2.400, 3.05),
}


def cost(multiplier: MultiplierLike) -> Optional[Cost]:
    """The published cost of ``multiplier`` against its source's exact multiplier, or None if none is published.

    Covered: MBM and Mitchell at 8 and 16 bits and in float32 (the MBM paper), a table with the
    same products as one of those (e.g. a CSV of mbm-int8), and every EvoApproxLib circuit loaded
    in this process (``evoapprox:<name>``) whose width has an exact circuit in the library.
    """
    mult = as_multiplier(multiplier)
    if mult.is_exact:
        return Cost("exact", "definition", "any", "exact", 1.0, 1.0)
    if mult.kind == "table":
        return _table_cost(mult)
    return _PUBLISHED.get(mult.name)


def _table_cost(mult: Multiplier) -> Optional[Cost]:
    circuit = circuit_for_digest(mult.digest)
    if circuit is not None:
        return _circuit_cost(circuit)
    twin = _design_of_table().get(mult.digest)
    return None if twin is None else dataclasses.replace(_PUBLISHED[twin], design=mult.name)


@functools.lru_cache(maxsize=1)
def _design_of_table() -> dict[str, str]:
    """Digest of the generated table -> name, for the costed integer designs that fit a table (8-bit)."""
    return {generated_table(as_multiplier(name)).digest: name for name in ("mbm-int8", "mitchell-int8")}


def _circuit_cost(circuit) -> Optional[Cost]:
    """An EvoApproxLib circuit's header figures against the library's exact circuit of its width and sign."""
    figures, exact = circuit.figures, _EVOAPPROX_EXACT.get((circuit.bits, circuit.signed))
    if exact is None or "power_mw" not in figures:
        return None
    name, area, power_mw, delay = exact
    width = f"{circuit.bits}-bit {'signed' if circuit.signed else 'unsigned'}"
    own_area = figures.get("area_um2")
    return Cost(f"evoapprox:{circuit.name}", EVOAPPROX, width, name, None if own_area is None else own_area / area,
                figures["power_mw"] / power_mw, own_area, figures["power_mw"] * 1000, figures.get("delay_ns"), area,
                power_mw * 1000, delay)
