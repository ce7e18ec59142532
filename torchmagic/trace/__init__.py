"""The autograd trace: data model, recorder (op mode + node hooks), naming, building."""

from .model import GradientSummary, MissingGradient, PassInfo, SourceLine, TraceNode
from .recorder import Recorder
from .trace import Trace

__all__ = ["GradientSummary", "MissingGradient", "PassInfo", "Recorder", "SourceLine", "Trace", "TraceNode"]
