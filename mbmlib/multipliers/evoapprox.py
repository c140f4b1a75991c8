"""EvoApproxLib circuits (SPEC section 6) as table multipliers: each C model evaluated on every operand pair.

A circuit is a C file of EvoApproxLib (github ehw-fit/evoapproxlib, branch v2022): a header comment
with its error figures and 45 nm cost (``// MAE% = 0.081 %``, ``// PDK45_PWR = 0.301 mW``, ...), then
one function of two operands named A and B (in either order).  :func:`load_circuit` compiles the
file with the system C compiler (``$CC``, else ``cc``) next to a generated driver that calls the
function on all 2**n x 2**n pairs, reads the products back as a table (unsigned circuits
``mul<n>u_*``: indexed by magnitudes; signed ``mul<n>s_*``: by two's-complement operands
``a mod 2**n``), checks the table against the header's MAE%, and caches it by the file's content
under ``cache_dir() / "evoapprox"``.  Circuits up to :data:`MAX_TABLE_BITS` bits make tables;
16-bit and asymmetric (``mul8x4u_*``) ones are refused.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import os
import re
import shlex
import subprocess
import tempfile
from decimal import Decimal
from pathlib import Path
from typing import Optional

import torch

from ..cache import cache_dir
from .table import MAX_TABLE_BITS, checked_table, table_digest

__all__ = ["Circuit", "load_circuit", "list_circuits", "circuit_for_digest", "EVOAPPROX_ENV", "CLONE_COMMAND"]

EVOAPPROX_ENV = "MBMLIB_EVOAPPROX"  # the folder of an EvoApproxLib checkout, for circuits named without a path
CLONE_COMMAND = "git clone --branch v2022 https://github.com/ehw-fit/evoapproxlib"
DRIVER_VERSION = 1  # part of the cache key: bump when the driver's output changes
_COMPILE_FLAGS = ["-O1", "-w"]  # -O1: a 12-bit table in about a second; the circuits' warnings are not ours
_STDERR_LINES = 8

_FIGURE_KEYS = {"MAE%": "mae_pct", "MAE": "mae", "WCE%": "wce_pct", "WCE": "wce", "WCRE%": "wcre_pct",
                "EP%": "ep_pct", "MRE%": "mre_pct", "MSE": "mse", "PDK45_PWR": "power_mw",
                "PDK45_AREA": "area_um2", "PDK45_DELAY": "delay_ns"}
_HEADER_LINE = re.compile(r"^[ \t]*//[ \t]*([A-Z][A-Z0-9_]*%?)[ \t]*=[ \t]*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)",
                          re.M)
_COMMENTS = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)
_DEFINITION = re.compile(r"^[ \t]*([A-Za-z_][\w \t]*?)[ \t]+([A-Za-z_]\w*)\s*\(([^()]*)\)\s*\{", re.M)
_PARAMETER = re.compile(r"\s*((?:const\s+)?[A-Za-z_][\w\s]*?)\s+([A-Za-z_]\w*)\s*")
_NAMED_WIDTHS = re.compile(r"^mul(\d+)(?:x(\d+))?([us])_\w+$")
_QUALIFIERS = {"const", "static", "inline", "extern"}
_C_INTEGERS = {"uint8_t": (8, False), "int8_t": (8, True), "uint16_t": (16, False), "int16_t": (16, True),
               "uint32_t": (32, False), "int32_t": (32, True), "uint64_t": (64, False), "int64_t": (64, True),
               "int": (32, True), "unsigned int": (32, False), "unsigned": (32, False)}


@dataclasses.dataclass(frozen=True)
class Circuit:
    """An EvoApproxLib circuit loaded as a table: ``table[a mod 2**n, b mod 2**n]`` is its product.

    ``table`` is an int64 (2**n, 2**n) tensor indexed by magnitudes (unsigned) or by two's-complement
    operands (``signed``); ``figures`` the header's numbers (``mae_pct``, ``power_mw``, ... as floats,
    absent ones left out); ``sha256`` the file's content; ``digest`` the table's (as ``Multiplier.digest``).
    """

    name: str
    path: str
    bits: int
    signed: bool
    sha256: str
    digest: str
    table: torch.Tensor = dataclasses.field(compare=False, repr=False)
    figures: dict = dataclasses.field(compare=False, default_factory=dict)


@dataclasses.dataclass(frozen=True)
class _Signature:
    """The circuit function as declared: result type, name and (type, name) of each parameter in order."""

    result: str
    name: str
    params: tuple[tuple[str, str], ...]

    @property
    def prototype(self) -> str:
        """The C declaration the driver links against, the parameters as the file declares them."""
        return f"{self.result} {self.name}({', '.join(f'{t} {n}' for t, n in self.params)});"


_BY_DIGEST: dict[str, Circuit] = {}  # loaded circuits by table digest, for a Multiplier's header figures


def circuit_for_digest(digest: str) -> Optional[Circuit]:
    """The circuit loaded in this process whose table has ``digest`` (the latest, if several share it), else None."""
    return _BY_DIGEST.get(digest)


def load_circuit(spec: str, directory: Optional[str] = None) -> Circuit:
    """The circuit ``spec``: a ``.c`` path, or a name ("mul8s_1L2J") in the checkout ``directory``, else
    ``$MBMLIB_EVOAPPROX``.

    Built once per file content (compiled and run, about a second), then read from the cache.
    ValueError for a missing checkout or name, a width that makes no table, a compile error, or a
    table whose MAE% differs from the header's.
    """
    path = _circuit_path(spec, directory)
    content = path.read_bytes()
    source = content.decode("utf-8", errors="replace")
    signature = _signature(source, path)
    bits, signed = _width(signature, path)
    table, _ = checked_table(_table(content, path, signature, bits, signed), str(path), signed)
    texts = _header_texts(source)
    _check_mae(table, signed, texts, path)
    circuit = Circuit(signature.name, str(path), bits, signed, hashlib.sha256(content).hexdigest(),
                      table_digest(table, signed), table, {key: float(text) for key, text in texts.items()})
    _BY_DIGEST[circuit.digest] = circuit
    return circuit


def list_circuits(directory: Optional[str] = None, bits: int = 8) -> list[str]:
    """Sorted names of the n x n circuits (signed and unsigned) of width ``bits`` in a checkout."""
    names = []
    for name in _circuit_files(_checkout(directory)):
        match = _NAMED_WIDTHS.match(name)
        if match and match.group(2) is None and int(match.group(1)) == bits:
            names.append(name)
    return sorted(names)


# ---- finding the file ----

def _missing_checkout(why: str) -> ValueError:
    """The one error for a checkout that is not there: what to clone and where to point mbmlib."""
    return ValueError(f"{why}: EvoApproxLib circuits are named from a checkout; run `{CLONE_COMMAND}` and set "
                      f"{EVOAPPROX_ENV}=<its folder> (or pass --evoapprox-dir), or give the path of a .c file")


def _checkout(directory: Optional[str]) -> Path:
    """The checkout folder: ``directory``, else ``$MBMLIB_EVOAPPROX``; ValueError saying what to clone if none."""
    root = directory or os.environ.get(EVOAPPROX_ENV)
    if not root:
        raise _missing_checkout(f"no EvoApproxLib checkout given ({EVOAPPROX_ENV} is not set)")
    if not Path(root).expanduser().is_dir():
        raise _missing_checkout(f"EvoApproxLib checkout {root} is not a folder")
    return Path(root).expanduser()


def _circuit_files(root: Path) -> dict[str, list[Path]]:
    """Circuit name -> its files under ``root`` (the same circuit sits in several ``pareto_*`` folders)."""
    files: dict[str, list[Path]] = {}
    for path in sorted(root.rglob("mul*.c")):
        files.setdefault(path.stem, []).append(path)
    if not files:
        raise _missing_checkout(f"{root} holds no EvoApproxLib multipliers (mul*.c)")
    return files


def _circuit_path(spec: str, directory: Optional[str]) -> Path:
    """The file ``spec`` names: a path as given, or the one file of that circuit name in the checkout."""
    if "/" in spec or os.sep in spec or spec.endswith(".c"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ValueError(f"circuit file {spec} does not exist; give an EvoApproxLib .c file or a circuit name")
        return path
    root = _checkout(directory)
    files = _circuit_files(root)
    if spec not in files:
        close = difflib.get_close_matches(spec, list(files), n=5)
        raise ValueError(f"no circuit {spec!r} under {root}" + (f"; close names: {', '.join(close)}" if close else ""))
    return _one_circuit(files[spec])


def _one_circuit(paths: list[Path]) -> Path:
    """The first of the files of one name if they all hold the same circuit (code and figures: the library's
    copies differ in the comment naming their pareto front); ValueError naming them else."""
    circuits = {_code_and_figures(path.read_text(errors="replace")) for path in paths}
    if len(circuits) > 1:
        raise ValueError(f"circuit {paths[0].stem!r} has different files: {', '.join(map(str, paths))}; "
                         "load one of them by its path")
    return paths[0]


def _code_and_figures(source: str) -> tuple[str, tuple]:
    """What makes a circuit: its code without comments (whitespace folded) and its header figures."""
    return " ".join(_COMMENTS.sub(" ", source).split()), tuple(sorted(_header_texts(source).items()))


# ---- reading the C model ----

def _header_texts(source: str) -> dict[str, str]:
    """The header's figures as printed, by figure key (``mae_pct``: "0.081"); the first line of each wins."""
    texts: dict[str, str] = {}
    for label, value in _HEADER_LINE.findall(source):
        if label in _FIGURE_KEYS:
            texts.setdefault(_FIGURE_KEYS[label], value)
    return texts


def _signature(source: str, path: Path) -> _Signature:
    """The circuit's function: the definition named as the file, else the file's only ``mul*`` function."""
    found = {name: (result, params) for result, name, params in _DEFINITION.findall(_COMMENTS.sub(" ", source))}
    name = path.stem if path.stem in found else None
    if name is None:
        candidates = [n for n in found if n.startswith("mul")]
        if len(candidates) != 1:
            raise ValueError(f"{path}: cannot tell the circuit's function (found {sorted(found) or 'none'}); name it "
                             f"as the file, e.g. uint16_t {path.stem}(uint8_t A, uint8_t B)")
        name = candidates[0]
    result, params = found[name]
    return _Signature(_unqualified(result), name, _parameters(params, name, path))


def _parameters(text: str, name: str, path: Path) -> tuple[tuple[str, str], ...]:
    """(type, name) of the two operands A and B in declared order (names in either case)."""
    params = []
    for part in text.split(","):
        match = _PARAMETER.fullmatch(part)
        if match is None:
            raise ValueError(f"{path}: cannot read parameter {part.strip()!r} of {name}")
        params.append((" ".join(match.group(1).split()), match.group(2)))
    if sorted(n.upper() for _, n in params) != ["A", "B"]:
        raise ValueError(f"{path}: {name} must take two operands named A and B, got "
                         f"{', '.join(n for _, n in params) or 'none'}")
    return tuple(params)


def _unqualified(ctype: str) -> str:
    """A C type without ``const``/``static``/...: what a cast or a prototype's result type needs."""
    return " ".join(w for w in ctype.split() if w not in _QUALIFIERS)


def _c_integer(ctype: str, path: Path) -> tuple[int, bool]:
    """(bits, signed) of a C integer type (qualifiers dropped); ValueError for any other type."""
    base = _unqualified(ctype)
    if base not in _C_INTEGERS:
        raise ValueError(f"{path}: unsupported C type {ctype!r}; circuits use the <stdint.h> integer types")
    return _C_INTEGERS[base]


def _width(signature: _Signature, path: Path) -> tuple[int, bool]:
    """(n, signed) of an n x n circuit from its name (``mul8s_*``), else its operand types; refusals else."""
    (bits, signed), (other, _) = (_c_integer(t, path) for t, _ in signature.params)
    _c_integer(signature.result, path)
    match = _NAMED_WIDTHS.match(signature.name)
    if match:
        bits, other, signed = int(match.group(1)), int(match.group(2) or match.group(1)), match.group(3) == "s"
    elif max(bits, other) > 16:
        raise ValueError(f"{path}: cannot tell the operand width of {signature.name} from its "
                         f"{max(bits, other)}-bit types; name it mul<n>u_<id> or mul<n>s_<id> as EvoApproxLib does")
    if other != bits:
        raise ValueError(f"{path}: {signature.name} multiplies {bits}-bit by {other}-bit operands; table layers "
                         "multiply two n-bit operands, so only n x n circuits load")
    if not 1 <= bits <= MAX_TABLE_BITS:
        raise ValueError(f"{path}: {signature.name} has {bits}-bit operands; tables stop at {MAX_TABLE_BITS} bits "
                         f"(a {bits}-bit table would have 2**{2 * bits} entries)")
    return bits, signed


# ---- evaluating it ----

_DRIVER = """\
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

{prototype}

static int32_t mbmlib_product(int64_t mbmlib_a, int64_t mbmlib_b) {{
    const uint64_t mbmlib_word = (uint64_t){call} & {mask}ULL;
    return {result};
}}

int main(int argc, char **argv) {{
    const int64_t size = {size};
    int32_t *row = malloc(sizeof(int32_t) * size);
    FILE *out = argc == 2 ? fopen(argv[1], "wb") : NULL;
    if (row == NULL || out == NULL) return 2;
    for (int64_t i = 0; i < size; i++) {{
        for (int64_t j = 0; j < size; j++) row[j] = mbmlib_product({operand_i}, {operand_j});
        if (fwrite(row, sizeof(int32_t), size, out) != (size_t)size) return 3;
    }}
    return fclose(out) == 0 ? 0 : 4;
}}
"""


def _driver_source(signature: _Signature, bits: int, signed: bool) -> str:
    """A C program writing the products of all pairs as int32, row a, column b, to the file argv[1].

    Its own names start with ``mbmlib_`` where they meet the circuit's, so no circuit name clashes.
    Operands are ``i`` (unsigned) or the two's-complement value of ``i`` (signed), cast to the declared
    types and passed by name.  The product is the result's low 2n bits (the circuit's output word: some
    signed models return it in a wider or unsigned type unextended), read as two's complement if signed.
    """
    def operand(index: str) -> str:
        return f"({index} >= size / 2 ? {index} - size : {index})" if signed else index

    half = 1 << (2 * bits - 1)
    result = f"(int32_t)((int64_t)(mbmlib_word ^ {half}ULL) - {half}LL)" if signed else "(int32_t)mbmlib_word"
    call = f"{signature.name}({', '.join(f'({_unqualified(t)})mbmlib_{n.lower()}' for t, n in signature.params)})"
    return _DRIVER.format(prototype=signature.prototype, call=call, mask=(1 << 2 * bits) - 1, result=result,
                          size=1 << bits, operand_i=operand("i"), operand_j=operand("j"))


def _table(content: bytes, path: Path, signature: _Signature, bits: int, signed: bool) -> torch.Tensor:
    """The circuit's (2**n, 2**n) int64 products: the cached ones for this content, else built and cached
    (as int32, half the disk of int64: a 2n-bit word always fits, 64 MB for a 12-bit circuit)."""
    size = 1 << bits
    key = hashlib.sha256(content + f"\0driver {DRIVER_VERSION}".encode()).hexdigest()
    target = cache_dir() / "evoapprox" / f"{signature.name}-{key[:20]}.i32"
    if not (target.is_file() and target.stat().st_size == 4 * size * size):
        _build(content, path, signature, bits, signed, target)
    table = torch.from_file(str(target), shared=False, size=size * size, dtype=torch.int32)
    return table.view(size, size).to(torch.int64)


def _build(content: bytes, path: Path, signature: _Signature, bits: int, signed: bool, target: Path) -> None:
    """Compile the circuit with the driver and run it; its output lands in ``target`` atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(suffix=".part", dir=target.parent)
    os.close(fd)
    try:
        with tempfile.TemporaryDirectory(prefix="mbmlib-evoapprox-") as work:
            work = Path(work)
            (work / path.name).write_bytes(content)  # the content hashed, under its own name for the messages
            (work / "mbmlib_driver.c").write_text(_driver_source(signature, bits, signed))
            compiler = shlex.split(os.environ.get("CC") or "cc")
            _run([*compiler, *_COMPILE_FLAGS, "-o", str(work / "mbmlib_driver"), str(work / path.name),
                  str(work / "mbmlib_driver.c")], f"{' '.join(compiler)} failed to compile", path)
            _run([str(work / "mbmlib_driver"), partial], "its evaluation failed", path)
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def _run(command: list[str], failure: str, path: Path) -> None:
    """Run a build step; ValueError naming the circuit with the first lines of stderr if it fails."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, errors="replace")
    except OSError as err:
        raise ValueError(f"{path}: cannot run {command[0]!r} ({err.strerror}); install a C compiler or set CC") \
            from None
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()[:_STDERR_LINES]
        raise ValueError(f"{path}: {failure} (exit {done.returncode}): " + " | ".join(lines))


# ---- checking it ----

def _mean_abs_error(table: torch.Tensor, signed: bool) -> float:
    """The mean |P - exact product| over all 2**(2n) operand pairs."""
    size = table.shape[0]
    operands = torch.arange(size, dtype=torch.int64)
    if signed:
        operands = torch.where(operands >= size // 2, operands - size, operands)
    return (table - operands[:, None] * operands[None, :]).abs().sum().item() / size**2


def _rounds_to(value: float, printed: str) -> bool:
    """Whether ``value`` printed to the digits of ``printed`` could read ``printed`` (half a last digit off)."""
    return abs(value - float(printed)) <= 0.5 * 10.0 ** Decimal(printed).as_tuple().exponent * (1 + 1e-9)


def _check_mae(table: torch.Tensor, signed: bool, texts: dict[str, str], path: Path) -> None:
    """ValueError if the table's MAE% (mean |P - exact| / 2**(2n), in %) is not the header's.

    The header's MAE% is the table's rounded to its printed digits, or (as the library derives it) the
    header's MAE, itself the table's rounded, over 2**(2n): mul8s_1KV8's MAE 1.25 reads "1.2" and "0.0018 %".
    """
    if "mae_pct" not in texts:
        return
    mae = _mean_abs_error(table, signed)
    percent = 100.0 / table.shape[0] ** 2
    candidates = [mae * percent]
    if "mae" in texts and _rounds_to(mae, texts["mae"]):
        candidates.append(float(texts["mae"]) * percent)
    if not any(_rounds_to(value, texts["mae_pct"]) for value in candidates):
        raise ValueError(f"{path}: the table's MAE% is {mae * percent:.6g} % (MAE {mae:.6g}) but the header says "
                         f"{texts['mae_pct']} %; the C model and its figures disagree (a changed file?)")
