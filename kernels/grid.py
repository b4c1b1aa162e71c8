"""Grid arithmetic for the launchers in plain Python: ``triton.cdiv`` and
``triton.next_power_of_2`` are constexpr-function wrappers that cost ~1.6 us per call from
Python (Triton 3.6 and 3.8), and a loss call makes a dozen of them."""


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (0 for n = 0), as ``triton.next_power_of_2``."""
    return 1 << (n - 1).bit_length() if n > 0 else 0
