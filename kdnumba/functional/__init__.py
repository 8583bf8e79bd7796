"""The functional layer: pure ``(loss, grad)`` functions.

Each function validates its inputs, dispatches on dtype and device, and runs
one fused kernel. They never modify their inputs.

========================  =======================================================
function                  loss
========================  =======================================================
``kd_loss``               ``alpha*CE(softmax(s), y) + (1-alpha)*T^2*KL(p^T(t)||p^T(s))``
========================  =======================================================
"""

from kdnumba.functional.response import kd_loss

__all__ = ["kd_loss"]
