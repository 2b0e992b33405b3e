"""An online model of iteration time and power as functions of a device's power knob (for slo-feedback)."""

from __future__ import annotations

from collections import deque

import numpy as np

from scheduler.power.options import SloFeedbackOptions


class OnlineProfile:
    """Iteration time and power as functions of the knob, refit from measurements (non-negative least squares).

    t(x, n) = a + b h/x + c n + d n h/x        (h = knob max; the h/x terms scale with 1/clock)
    P(x, n) = p0 + p1 u + p3 u^3 + p4 n u      (u = x / h)
    A prior shape (pseudo-samples, small weight) keeps the fit defined before the knob has moved.
    """

    def __init__(self, lo: float, hi: float, opts: SloFeedbackOptions):
        self.lo, self.hi, self.opts = lo, hi, opts
        self.samples: deque[tuple[float, float, float, float]] = deque(maxlen=opts.window_samples)
        self.t_coef: np.ndarray | None = None
        self.p_coef: np.ndarray | None = None

    def add(self, x: float, iteration_seconds: float, power_watts: float, batch: float) -> None:
        if x > 0 and iteration_seconds > 0 and power_watts > 0:
            self.samples.append((x, iteration_seconds, power_watts, max(batch, 1.0)))

    def _t_features(self, x, n):
        r = self.hi / np.asarray(x, dtype=float)
        n = np.broadcast_to(np.asarray(n, dtype=float), r.shape)
        return np.stack([np.ones_like(r), r, n, n * r], axis=-1)

    def _p_features(self, x, n):
        u = np.asarray(x, dtype=float) / self.hi
        n = np.broadcast_to(np.asarray(n, dtype=float), u.shape)
        return np.stack([np.ones_like(u), u, u**3, n * u], axis=-1)

    def refit(self) -> bool:
        from scipy.optimize import nnls  # scipy.optimize takes ~1 s to import; only slo-feedback needs it

        if not self.samples:
            return False
        o = self.opts
        xs, ts, ps, ns = (np.array(c, dtype=float) for c in zip(*self.samples))
        # prior pseudo-samples anchored at the latest measurement, shaped by published behaviour
        x_ref, t_ref, p_ref, n_ref = xs[-1], ts[-1], ps[-1], ns[-1]
        cf, sf = o.prior_compute_fraction, o.prior_static_power_fraction

        def t_shape(x):
            return (1 - cf) + cf * self.hi / x

        def p_shape(x):
            u = x / self.hi
            return sf + (1 - sf) * (0.3 * u + 0.7 * u**3)

        grid = np.linspace(self.lo, self.hi, 8)
        t_prior = t_ref * t_shape(grid) / t_shape(x_ref)
        p_prior = p_ref * p_shape(grid) / p_shape(x_ref)
        w_real = np.ones_like(xs)
        w_prior = np.full_like(grid, o.prior_weight)
        X = np.concatenate([xs, grid])
        N = np.concatenate([ns, np.full_like(grid, n_ref)])
        W = np.sqrt(np.concatenate([w_real, w_prior]))
        T = np.concatenate([ts, t_prior])
        P = np.concatenate([ps, p_prior])
        # relative errors: scale rows by 1/target so small and large values weigh alike
        At = self._t_features(X, N) * (W / T)[:, None]
        Ap = self._p_features(X, N) * (W / P)[:, None]
        self.t_coef, _ = nnls(At, W, maxiter=200)
        self.p_coef, _ = nnls(Ap, W, maxiter=200)
        return True

    def iteration_seconds(self, x, n):
        return self._t_features(x, n) @ self.t_coef

    def power_watts(self, x, n):
        return self._p_features(x, n) @ self.p_coef
