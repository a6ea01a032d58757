"""Temperature scaling (Guo et al., 2017, "On Calibration of Modern Neural Networks").

One scalar T, fitted on the validation split's log loss after training, divides the logits
before the softmax. Dividing every logit by the same T > 0 keeps their order, so no top-1
answer changes; only how sure the model says it is. T is baked into the classifier's last
Dense layer (kernel and bias divided by T): softmax((Wx + b) / T) = softmax((W/T)x + b/T), so
the `.keras` file, every export and the served model give calibrated probabilities with no
extra layer to serialise.
"""

from __future__ import annotations

import numpy as np

from imgclf.metrics import nll

# Wide enough for any network seen in practice (Guo et al. report T between 1 and 3), bounded
# so a degenerate validation split (all right, all wrong) cannot push T to 0 or infinity.
T_MIN, T_MAX = 0.05, 20.0


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The T in [T_MIN, T_MAX] minimising the log loss of `probs` rescaled to T.

    The log loss is convex in 1/T, so a bounded scalar search over log T finds the minimum;
    T = 1 (no change) is kept unless the fitted T is strictly better.
    """
    from scipy.optimize import minimize_scalar

    if len(labels) == 0:
        return 1.0
    result = minimize_scalar(lambda log_t: nll(probs, labels, float(np.exp(log_t))),
                             bounds=(np.log(T_MIN), np.log(T_MAX)), method="bounded",
                             options={"xatol": 1e-4})
    fitted = float(np.exp(result.x))
    return fitted if nll(probs, labels, fitted) < nll(probs, labels, 1.0) else 1.0


def bake_temperature(model, temperature: float, layer: str = "head_logits") -> None:
    """Divide the softmax layer's kernel and bias by T, in place."""
    dense = model.get_layer(layer)
    dense.set_weights([w / temperature for w in dense.get_weights()])
