"""Output tiles of the Triton kernels and the host's choice among them (plain Python: no Triton needed)."""
from __future__ import annotations

import os
from typing import NamedTuple

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # decided once: triton reads it at decoration time


class Tile(NamedTuple):
    """An output tile of BLOCK_N x BLOCK_M: TN x TM per thread, TM = BLOCK_M / (32 * num_warps) rows along the lanes."""
    block_m: int
    block_n: int
    num_warps: int

    @property
    def tm(self) -> int:
        return max(1, self.block_m // (32 * self.num_warps))

    @property
    def tn(self) -> int:
        return self.block_n

    def meta(self) -> dict:
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "num_warps": self.num_warps, "num_stages": 1}


# Tiles the host picks from (see pick_tile).  8 x 4 / 8 x 8 a thread keep 0.4 or fewer loads per MAC;
# 4 x 4 and one warp serve small problems (linear layers of a small batch, grad_w of a first layer).
TILES = (Tile(1024, 4, 4), Tile(512, 8, 2), Tile(256, 8, 2), Tile(256, 4, 1), Tile(128, 4, 1))
DEFAULT_TILE = TILES[0]
# The convolution forward and input-gradient kernels (float and integer) keep 32 outputs a thread at most:
# with 64 (the 8 x 8 tile) they hold 168-254 registers on sm_75 / sm_90 and the Mitchell forward spills (24-byte
# stack frame on sm_90), and capping the 8 x 4 tile at 128 registers (maxnreg) spills 4-96 bytes outside the loops.
CONV_TILES = tuple(t for t in TILES if t.tm * t.tn <= 32)
_INTERPRET_TILE = Tile(16, 4, 1)  # under the interpreter: a few, partly padded tiles on the tests' shapes


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pick_tile(m: int, n: int, tiles=TILES) -> Tile:
    """The tile for an (m, n) output: least padded work, a little penalty for thin tiles, then the largest."""
    def cost(t: Tile):
        padded = _cdiv(m, t.block_m) * t.block_m * _cdiv(n, t.block_n) * t.block_n
        return padded * (1.0 + 0.5 / t.tm + 0.5 / t.tn), -t.block_m * t.block_n

    return min(tiles, key=cost)


def _tile_for(m: int, n: int, tile: Tile | None, tiles=TILES) -> Tile:
    """The caller's tile (tests), the interpreter's small one, or pick_tile's among ``tiles``."""
    return tile or (_INTERPRET_TILE if INTERPRET else pick_tile(m, n, tiles))
