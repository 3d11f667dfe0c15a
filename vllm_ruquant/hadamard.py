"""Hadamard matrices of the sizes LLM layers need, built from first principles.

Online rotations must be cheap, so a rotation of size ``n = 2**k * m`` is applied as
a Kronecker product ``H_m (x) H_{2**k}``: a fast Walsh-Hadamard transform over the
power-of-two factor and a small dense ``m x m`` product over the rest. This module
builds the small ``H_m`` factors:

* Sylvester doubling for powers of two;
* Paley construction I  (order ``q + 1``,   ``q`` a prime power, ``q = 3 mod 4``);
* Paley construction II (order ``2(q + 1)``, ``q`` a prime power, ``q = 1 mod 4``);
* Kronecker doubling ``H_2 (x) H_{m/2}`` (e.g. 40 = 2*20);
* Williamson construction (order ``4n``) from four symmetric circulant +-1 blocks whose
  first rows are recorded in ``_WILLIAMSON_NEGATIVES``: 156 (= 4*39) and 172 (= 4*43),
  which no Paley construction reaches. 172 is the quickstart's intermediate size 344
  split over two tensor-parallel ranks (``--tp-size 2`` rotates each shard on its own).

Which factor a size uses is part of every converted checkpoint (the converter absorbs
``H_m (x) H_p`` into the weights, the server applies it online; the format records only
the size). So ``factor_size`` never changes its answer for a size it could factor before
the Williamson orders existed: they are used only where no other factor works (344 stays
Paley I's H_344, 11008 stays 344*32 and its shard 5504 is 344*16; only 156 and 172 use
the Williamson matrices).

Every matrix is checked (``H H^T = n I``) before it is returned, so a wrong
construction can never silently produce a non-orthogonal "rotation".
"""

from __future__ import annotations

import functools
import itertools

import torch

# The non-power-of-two factors we promise to support (DESIGN.md, issue 2), smallest first.
SUPPORTED_FACTORS: tuple[int, ...] = (12, 20, 28, 36, 40, 44, 52, 60, 76, 108, 140, 148, 156, 172, 344)


def _is_prime(p: int) -> bool:
    return p >= 2 and all(p % d for d in range(2, int(p**0.5) + 1))


def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q = p**k, or None."""
    for p in range(2, q + 1):
        if q % p == 0:
            if not _is_prime(p):
                return None
            k, r = 0, q
            while r % p == 0:
                r //= p
                k += 1
            return (p, k) if r == 1 else None
    return None


class _GF:
    """The finite field GF(p**k), elements numbered 0..q-1 by their base-p digits."""

    def __init__(self, p: int, k: int) -> None:
        self.p, self.k, self.q = p, k, p**k
        self.modulus = self._irreducible() if k > 1 else None

    def _digits(self, a: int) -> list[int]:
        return [(a // self.p**i) % self.p for i in range(self.k)]

    def _number(self, digits: list[int]) -> int:
        return sum(d * self.p**i for i, d in enumerate(digits))

    def _poly_mulmod(self, a: list[int], b: list[int], mod: list[int] | None) -> list[int]:
        p, k = self.p, self.k
        prod = [0] * (2 * k - 1)
        for i, x in enumerate(a):
            for j, y in enumerate(b):
                prod[i + j] = (prod[i + j] + x * y) % p
        if mod is not None:  # reduce by the monic modulus of degree k
            for deg in range(len(prod) - 1, k - 1, -1):
                c = prod[deg]
                if c:
                    for i in range(k + 1):
                        prod[deg - k + i] = (prod[deg - k + i] - c * mod[i]) % p
        return prod[:k]

    def _irreducible(self) -> list[int]:
        """A monic irreducible polynomial of degree k (coefficients low to high)."""
        p, k = self.p, self.k
        for tail in itertools.product(range(p), repeat=k):
            mod = list(tail) + [1]
            if mod[0] == 0:
                continue
            # irreducible of degree k <=> x has multiplicative order dividing p**k - 1 and the
            # field it generates has q elements: check that no nonzero element squares... simpler:
            # brute force that no polynomial of degree 1..k//2 divides it.
            if all(not self._divides(list(f) + [1], mod) for d in range(1, k // 2 + 1)
                   for f in itertools.product(range(p), repeat=d)):
                return mod
        raise AssertionError("no irreducible polynomial found")  # cannot happen for a field

    def _divides(self, f: list[int], g: list[int]) -> bool:
        p = self.p
        r = list(g)
        while len(r) >= len(f):
            c = r[-1]
            if c:
                shift = len(r) - len(f)
                for i, fc in enumerate(f):
                    r[shift + i] = (r[shift + i] - c * fc) % p
            r.pop()
        return not any(r)

    def sub(self, a: int, b: int) -> int:
        da, db = self._digits(a), self._digits(b)
        return self._number([(x - y) % self.p for x, y in zip(da, db, strict=True)])

    def squares(self) -> set[int]:
        """The nonzero squares of the field."""
        out = set()
        for a in range(1, self.q):
            d = self._digits(a)
            out.add(self._number(self._poly_mulmod(d, d, self.modulus)))
        return out


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[a, b] = chi(a - b) for the quadratic character chi of GF(q)."""
    p, k = _prime_power(q)  # type: ignore[misc]
    field = _GF(p, k)
    sq = field.squares()
    Q = torch.zeros(q, q, dtype=torch.float32)
    for a in range(q):
        for b in range(q):
            d = field.sub(a, b)
            Q[a, b] = 0 if d == 0 else (1 if d in sq else -1)
    return Q


def _paley1(q: int) -> torch.Tensor:
    Q = _jacobsthal(q)
    n = q + 1
    S = torch.zeros(n, n, dtype=torch.float32)
    S[0, 1:] = 1
    S[1:, 0] = -1
    S[1:, 1:] = Q
    return S + torch.eye(n, dtype=torch.float32)


def _paley2(q: int) -> torch.Tensor:
    Q = _jacobsthal(q)
    n = q + 1
    C = torch.zeros(n, n, dtype=torch.float32)
    C[0, 1:] = 1
    C[1:, 0] = 1
    C[1:, 1:] = Q
    # replace 0 -> [[1,-1],[-1,-1]], +-1 -> +-[[1,1],[1,-1]]
    zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float32)
    one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float32)
    return torch.kron(C, one) + torch.kron((C == 0).float(), zero)


def _circulant(row: list[int]) -> torch.Tensor:
    n = len(row)
    r = torch.tensor(row, dtype=torch.float32)
    return torch.stack([torch.roll(r, i) for i in range(n)])


# First rows of symmetric circulant Williamson matrices A, B, C, D (A^2+B^2+C^2+D^2 = 4n I),
# written as the positions j in 1..n//2 whose entry is -1 (entry 0 is +1; symmetry gives the
# rest). Every use is verified by ``_check``.
# Source: the table of SageMath's ``williamson_type_quadruples_smallcases``
# (src/sage/combinat/matrices/hadamard_matrix.py), which credits n = 43 to M. Hall,
# "Combinatorial Theory", 2nd ed. (1983) and n = 39 to S. London, "Constructing new Turyn
# type sequences, T-sequences and Hadamard matrices", PhD thesis, UIC (2013); its +/- rows,
# rewritten here as the positions of their minus signs.
_WILLIAMSON_NEGATIVES: dict[int, tuple[tuple[int, ...], ...]] = {
    39: ((3, 4, 6, 8, 9, 10, 11, 12, 14, 15, 18, 19), (3, 4, 7, 9, 10, 11, 13, 15, 16, 18, 19),
         (4, 5, 6, 8, 9, 12, 13, 14, 15, 17, 19), (1, 2, 3, 6, 8, 10, 11, 12, 13, 14, 18)),
    43: ((2, 3, 4, 9, 11, 12, 14, 15, 18, 19, 20, 21), (3, 5, 8, 9, 11, 13, 18, 20, 21),
         (2, 9, 10, 11, 12, 14, 16, 17, 20), (1, 2, 3, 6, 7, 12, 14, 18, 21)),
}


def _williamson_from_negatives(n: int, negs: tuple[tuple[int, ...], ...]) -> torch.Tensor:
    blocks = []
    for neg in negs:
        row = [1] * n
        for j in neg:
            row[j] = -1
            row[n - j] = -1
        blocks.append(_circulant(row))
    A, B, C, D = blocks
    return torch.cat([
        torch.cat([A, B, C, D], 1),
        torch.cat([-B, A, -D, C], 1),
        torch.cat([-C, D, A, -B], 1),
        torch.cat([-D, -C, B, A], 1),
    ], 0)


def _paley_q(m: int) -> tuple[int, int] | None:
    """(1, q) when Paley I reaches order m, (2, q) when Paley II does, else None."""
    q = m - 1
    if q >= 3 and q % 4 == 3 and _prime_power(q):
        return 1, q
    q = m // 2 - 1
    if m % 2 == 0 and q >= 5 and q % 4 == 1 and _prime_power(q):
        return 2, q
    return None


def _construction(m: int, williamson: bool) -> str | None:
    """How H_m is built ("sylvester", "paley", "double" or "williamson"), or None; cheap.

    The order of the tests is the order of preference; ``williamson=False`` answers as this
    module did before the Williamson table existed (``factor_size`` relies on it).
    """
    if m >= 1 and m & (m - 1) == 0:
        return "sylvester"
    if m < 1 or m % 4:
        return None
    if _paley_q(m):
        return "paley"
    if m % 8 == 0 and _construction(m // 2, williamson):  # m = 2 * m', m' constructible
        return "double"
    if williamson and m // 4 in _WILLIAMSON_NEGATIVES:
        return "williamson"
    return None


def _check(H: torch.Tensor) -> torch.Tensor:
    n = H.shape[0]
    if H.dtype != torch.float32 or not torch.equal(H @ H.T, n * torch.eye(n, dtype=torch.float32)):
        raise AssertionError(f"internal error: constructed matrix of order {n} is not Hadamard")
    return H


_ON_DEVICE: dict[tuple[int, torch.device], torch.Tensor] = {}


def small_hadamard_on(m: int, device: torch.device | str) -> torch.Tensor:
    """``small_hadamard(m)`` resident on ``device``, copied there once.

    A copy from host memory per call is not only slow but illegal while a CUDA graph is being
    captured (vLLM captures every decode size at engine start), so the rotation reads the
    cached device copy; the first call (vLLM's profiling run, or the layer's ``prepare``)
    makes it, outside any capture.
    """
    key = (m, torch.device(device))
    t = _ON_DEVICE.get(key)
    if t is None:
        t = _ON_DEVICE[key] = small_hadamard(m).to(key[1])
    return t


@functools.cache
def small_hadamard(m: int) -> torch.Tensor:
    """An unnormalised Hadamard matrix of order ``m`` (entries +-1, H H^T = m I), always fp32.

    Cached, so it must not depend on the caller's state: every tensor here names its dtype,
    because vLLM builds layers under ``torch.set_default_dtype(bfloat16)`` and a matrix first
    built there would be cached in bf16 for everyone (the GPU crash of issue 20).
    Raises ValueError when ``m`` is not an order we can build.
    """
    if m < 1:
        raise ValueError(f"Hadamard order must be positive, got {m}")
    if m > 2 and m % 4:
        raise ValueError(f"no Hadamard matrix of order {m} exists (orders are 1, 2 or multiples of 4)")
    how = _construction(m, williamson=True)
    if how == "sylvester":
        H = torch.ones(1, 1, dtype=torch.float32)
        while H.shape[0] < m:
            H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    elif how == "paley":
        kind, q = _paley_q(m)  # type: ignore[misc]
        H = _paley1(q) if kind == 1 else _paley2(q)
    elif how == "double":
        H = torch.kron(small_hadamard(2), small_hadamard(m // 2))
    elif how == "williamson":
        H = _williamson_from_negatives(m // 4, _WILLIAMSON_NEGATIVES[m // 4])
    else:
        raise ValueError(f"no construction for a Hadamard matrix of order {m} is implemented")
    return _check(H)


# The largest dense factor an online rotation may use: beyond it the m x m product costs
# more than the transform is worth, and building it (Paley over GF(m-1)) takes seconds.
MAX_DENSE_FACTOR = 1024


def factor_size(n: int) -> tuple[int, int]:
    """Split ``n`` into (m, p): ``n = m * p``, p a power of two, H_m constructible.

    Prefers the smallest dense factor m (cheapest online) among the Sylvester / Paley /
    doubling orders, and a Williamson order only where none of those works: the choice is
    baked into converted checkpoints, so the Williamson orders must not change it for a
    size that was constructible without them (module docstring). Raises ValueError naming
    the supported sizes otherwise.
    """
    if n >= 1 and n & (n - 1) == 0:
        return 1, n
    p = n & -n  # largest power of two dividing n
    odd = n // p
    for williamson in (False, True):
        # try m = odd * 2**j for growing j (m must be a multiple of 4)
        j = 0
        while (1 << j) <= p:
            m = odd * (1 << j)
            if m > MAX_DENSE_FACTOR:
                break
            if m % 4 == 0 and _construction(m, williamson):
                return m, n // m
            j += 1
    raise ValueError(
        f"no Hadamard rotation of size {n}: sizes must be 2^k or 2^k*m with a constructible "
        f"factor m (e.g. {', '.join(map(str, SUPPORTED_FACTORS))})"
    )


def is_hadamard_size(n: int) -> bool:
    try:
        factor_size(n)
        return True
    except ValueError:
        return False


@functools.lru_cache(maxsize=32)
def hadamard_matrix(n: int) -> torch.Tensor:
    """The full unnormalised Hadamard matrix ``H_m (x) H_p`` of order n (fp32).

    This is the matrix the online rotation op applies (divided by sqrt(n)); it is dense
    and O(n^2), meant for the converter and tests, never the serving hot path.
    """
    m, p = factor_size(n)
    return torch.kron(small_hadamard(m), small_hadamard(p))
