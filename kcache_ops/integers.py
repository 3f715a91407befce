"""Number and flag arguments of any type: an integer as a Python int, a NumPy integer or a 0-d
integer tensor; a real number as those, a float, a NumPy float or a 0-d floating tensor; a flag as
a Python bool, a NumPy bool or a 0-d bool tensor. A tensor on the meta device has no value: it is
none of them."""
import numbers
import operator


def _valueless(value):
    """Whether ``value`` is a tensor on the meta device (shape and dtype only)."""
    return getattr(value, "is_meta", False) is True


def as_int(value):
    """``value`` as an int where it is an integer of any type (a NumPy one, a 0-d integer tensor),
    else None (a bool of any kind, a float, a string, a tensor of one element but 1 dim or more,
    which torch would index by)."""
    if isinstance(value, int):  # a Python one, or one torch.compile traces as a symbol
        return None if isinstance(value, bool) else value
    if str(getattr(value, "dtype", "")) in ("bool", "torch.bool") or _valueless(value):
        return None
    if getattr(value, "ndim", 0) != 0:
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def is_integer_dtype(dtype):
    """Whether the torch ``dtype`` holds integers (bool does not: it is a flag)."""
    return not (dtype.is_floating_point or dtype.is_complex) and str(dtype) != "torch.bool"


def int_at_least(value, least):
    """``value`` as an int where it is an integer of any type (:func:`as_int`) >= ``least``, else
    None: the check of a count, a size or a length, whose caller names it in its error."""
    n = as_int(value)
    return None if n is None or n < least else n


def as_real(value):
    """``value`` as a float where it is a real number of any type (an integer as :func:`as_int`
    takes it, a float, a NumPy float, a 0-d floating tensor or array), else None (a bool of any
    kind, a complex, a string, a tensor of 1 dim or more, an int past the float range)."""
    if isinstance(value, bool):
        return None
    if not isinstance(value, (int, float)):  # else a Python one, or one torch.compile traces
        if _valueless(value):
            return None
        n = as_int(value)
        dtype = getattr(value, "dtype", None)  # a tensor's (is_floating_point) or NumPy's (kind)
        floating = (getattr(dtype, "is_floating_point", False) is True
                    or getattr(dtype, "kind", "") == "f")
        if n is not None:
            value = n
        elif getattr(value, "ndim", 0) != 0 or not (isinstance(value, numbers.Real) or floating):
            return None
    try:
        return float(value)
    except OverflowError:
        return None


def as_bool(value):
    """``value`` as a bool where it is a flag of any type (a Python or NumPy bool, a 0-d bool
    tensor or array), else None (an int, 0 and 1 included: a count passed where a flag goes; a
    string; a tensor of 1 dim or more)."""
    if isinstance(value, bool):  # a Python one, or one torch.compile traces as a symbol
        return value
    is_bool = str(getattr(value, "dtype", "")) in ("bool", "torch.bool")
    scalar = is_bool and getattr(value, "ndim", 0) == 0 and not _valueless(value)
    return bool(value) if scalar else None
