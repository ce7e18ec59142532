"""The package's exceptions; the magics turn them into one-line UsageErrors."""


class TorchMagicError(Exception):
    """Base class for errors that torchmagic reports to the user."""


class DeviceError(TorchMagicError):
    """A device spec that cannot be parsed, or names a device that is not available."""


class MoveError(TorchMagicError):
    """Moving the namespace to another device failed part-way and was rolled back."""


class OptionError(TorchMagicError):
    """An option value that torchmagic cannot use (a dtype name, a file extension...)."""


class LayoutTimeout(TorchMagicError):
    """Graphviz took longer than allowed to lay out a diagram; it was stopped."""


class NonFiniteGradient(RuntimeError):
    """A backward pass computed a NaN or Inf gradient, and the trace was asked to stop there
    (``--stop-on-nan``). The message says where it first appeared and what fed it."""
