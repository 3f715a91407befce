"""Integer arguments of any integer type: a Python int, a NumPy integer, a 0-d integer tensor."""
import operator


def as_int(value):
    """``value`` as an int where it is an integer of any type (a NumPy one, a 0-d integer tensor),
    else None (a bool of any kind, a float, a string, a tensor of one element but 1 dim or more,
    which torch would index by)."""
    if isinstance(value, bool) or str(getattr(value, "dtype", "")) in ("bool", "torch.bool"):
        return None
    if getattr(value, "ndim", 0) != 0:
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def int_at_least(value, least):
    """``value`` as an int where it is an integer of any type (:func:`as_int`) >= ``least``, else
    None: the check of a count, a size or a length, whose caller names it in its error."""
    n = as_int(value)
    return None if n is None or n < least else n
