"""Launch-size arithmetic on the host.

Triton's own `triton.cdiv` / `triton.next_power_of_2` are constexpr-function objects that cost
about 5 µs a call on the host; a prefill's launchers call them a dozen times. These are the
same integer functions at plain-Python cost.
"""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for non-negative ints."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n; 0 for 0, as Triton's."""
    return 1 << (n - 1).bit_length() if n > 0 else 0
