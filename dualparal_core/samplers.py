"""Per-block sampler state machines over a sigma table given from outside, with ComfyUI's maths for flow models."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dualparal_core import logger
from dualparal_core.config import SAMPLER_NAMES

__all__ = ["SAMPLER_NAMES", "BlockSampler", "EulerSampler", "DPMPP2MSampler", "UniPCSampler", "UniPCBH2Sampler",
           "make_sampler"]


def _sigma_table(sigmas: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """A private 1-D float copy of the table (float32 unless given as a float64 tensor)."""
    s = torch.as_tensor(sigmas).detach()
    if not s.is_floating_point() or s.dtype not in (torch.float32, torch.float64):
        s = s.to(torch.float32)
    if s.ndim != 1 or s.numel() < 2:
        raise ValueError(f"The sigma table has shape {tuple(s.shape)}; it must be 1-D with at least 2 entries "
                         f"(steps + 1, descending, usually ending in 0).")
    return s.to("cpu", copy=True)


class BlockSampler:
    """One block's sampler: ``step`` takes x at ``sigmas[i]`` and the model's x0 prediction there to x at
    ``sigmas[i + 1]``; ``step_index`` counts the steps taken.

    Every block of the video owns one sampler object and steps it once per tick, interleaved with the other
    blocks, so all multistep history lives in the object. The engine never computes sigmas: the table comes from
    ComfyUI's own scheduler code. One block stepped S times gives what ComfyUI's ``KSAMPLER.sample`` gives for a
    flow ("CONST") model such as Wan, operation for operation (bit for bit on CPU float32, as
    tests/test_samplers.py checks against ComfyUI's own code; on GPU the operations are the same)::

        x = sampler.start(x_init)          # x_init = sigma[0]·noise + (1 − sigma[0])·latent (CONST noise_scaling)
        for i in range(sampler.steps):
            denoised = model(x, sampler.sigma)  # Wan: x − sigma·v (CONST calculate_denoised), CFG applied
            x = sampler.step(x, denoised)
        out = sampler.finish(x)            # CONST inverse_noise_scaling, as KSAMPLER.sample applies it

    ``start`` and ``finish`` are the identity for a table ending in 0, except for uni_pc (see ``UniPCSampler``).
    The computation runs in the dtype of the sigma table (float32 unless a float64 tensor is given, as ComfyUI's
    tables are float32) and of ``x``, on ``x``'s device, as ComfyUI moves its table to the model's device.
    """

    name: str = ""

    def __init__(self, sigmas: torch.Tensor | Sequence[float]) -> None:
        self.sigmas: torch.Tensor = _sigma_table(sigmas)
        """The table, CPU, never modified."""
        self.step_index: int = 0
        self._sig: torch.Tensor | None = None  # the table on x's device, bound at the first call

    @property
    def steps(self) -> int:
        """S, the number of steps (len(sigmas) - 1)."""
        return self.sigmas.numel() - 1

    @property
    def done(self) -> bool:
        return self.step_index >= self.steps

    @property
    def sigma(self) -> float:
        """The sigma the model is evaluated at for the next step (model timestep = sigma·1000 for Wan)."""
        return float(self.sigmas[min(self.step_index, self.steps)])

    def _bind(self, x: torch.Tensor) -> None:
        # Why: ComfyUI does all sampler arithmetic with the table on the model's device; doing the same keeps
        # results identical on GPU too, where some kernels round differently from the CPU ones.
        self._sig = self.sigmas.to(x.device)

    def start(self, x: torch.Tensor) -> torch.Tensor:
        """Take the initial x (at sigmas[0]) and return the tensor to evaluate the model at for step 0.

        Optional: ``step`` also works from the raw initial x. It matters only for uni_pc, whose ComfyUI
        implementation evaluates the model at x/√(1+σ0²)·√(σ0²+1), equal to x up to rounding.
        """
        if self.step_index:
            raise RuntimeError(f"{self.name}: start() must come before the first step (step {self.step_index}).")
        self._bind(x)
        return x

    def step(self, x: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
        """Advance one sigma: x at ``sigmas[i]`` (the tensor the model was evaluated at, i.e. what ``start`` or the
        previous ``step`` returned) and the model's x0 prediction there give x at ``sigmas[i + 1]``."""
        if self.done:
            raise RuntimeError(f"{self.name}: all {self.steps} steps of this block are already taken.")
        if self._sig is None:
            self._bind(x)
        out = self._step(self.step_index, x, denoised)
        self.step_index += 1
        return out

    def _step(self, i: int, x: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def final_sigma(self) -> torch.Tensor:
        """The sigma KSAMPLER.sample hands to inverse_noise_scaling after the sampler ran (0-d tensor)."""
        return self.sigmas[-1]

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """CONST ``inverse_noise_scaling(final_sigma, x)`` = x / (1 − final_sigma), as KSAMPLER.sample applies it
        after the sampler function (the identity when the table ends in 0, except for uni_pc)."""
        sigma = self.final_sigma.to(x.device)
        return x / (1.0 - sigma)


class EulerSampler(BlockSampler):
    """ComfyUI ``comfy/k_diffusion/sampling.py:sample_euler`` with s_churn = 0 (KSampler "euler"):
    d = (x − denoised)/σ_i, x ← x + d·(σ_{i+1} − σ_i)."""

    name = "euler"

    def _step(self, i: int, x: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
        s = self._sig
        sigma_hat = s[i]
        d = (x - denoised) / sigma_hat[(...,) + (None,) * x.ndim]  # k-diffusion to_d / append_dims
        dt = s[i + 1] - sigma_hat
        return x + d * dt


class DPMPP2MSampler(BlockSampler):
    """DPM-Solver++(2M): ComfyUI ``comfy/k_diffusion/sampling.py:sample_dpmpp_2m``, identical to k-diffusion's
    ``sample_dpmpp_2m`` (first-order on the first step and on a step to σ = 0)."""

    name = "dpmpp_2m"

    def __init__(self, sigmas: torch.Tensor | Sequence[float]) -> None:
        super().__init__(sigmas)
        self._old_denoised: torch.Tensor | None = None

    def _step(self, i: int, x: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
        s = self._sig
        t, t_next = s[i].log().neg(), s[i + 1].log().neg()
        h = t_next - t
        # The condition is read from the CPU table (same values) so that a GPU run does not sync here.
        if self._old_denoised is None or self.sigmas[i + 1] == 0:
            x = (t_next.neg().exp() / t.neg().exp()) * x - (-h).expm1() * denoised
        else:
            h_last = t - s[i - 1].log().neg()
            r = h_last / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * self._old_denoised
            x = (t_next.neg().exp() / t.neg().exp()) * x - (-h).expm1() * denoised_d
        self._old_denoised = denoised
        return x


# SigmaConvert of comfy/extra_samplers/uni_pc.py: ComfyUI's uni_pc reads every sigma table, flow ones included, as
# VE sigmas and solves in the matching VP space: alpha = 1/sqrt(1+σ²), std = σ/sqrt(1+σ²), lambda = −log σ.
def _log_mean_coeff(sigma: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.log(1 / ((sigma * sigma) + 1))


def _alpha(t: torch.Tensor) -> torch.Tensor:
    return torch.exp(_log_mean_coeff(t))


def _std(t: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(1. - torch.exp(2. * _log_mean_coeff(t)))


def _lambda(t: torch.Tensor) -> torch.Tensor:
    log_mean_coeff = _log_mean_coeff(t)
    log_std = 0.5 * torch.log(1. - torch.exp(2. * log_mean_coeff))
    return log_mean_coeff - log_std


def _expand(v: torch.Tensor, dims: int) -> torch.Tensor:
    return v[(...,) + (None,) * (dims - 1)]


class UniPCSampler(BlockSampler):
    """UniPC, variant B(h) = h: ComfyUI sampler "uni_pc" = ``comfy/extra_samplers/uni_pc.py:sample_unipc``
    (``UniPC.sample``, multistep, predict_x0, order min(3, S − 1), lower_order_final) as KSAMPLER runs it.

    ComfyUI's conventions, followed here exactly (they differ from diffusers' flow-matching UniPC):

    * sigmas are treated as VE sigmas even for flow models: the state is x/√(1+σ²), lambda = −log σ;
    * a final sigma of 0 becomes 0.001 (ComfyUI writes it into its own table, in place), so the last step goes to
      σ = 0.001 and the result is divided by alpha(0.001); KSAMPLER then divides by (1 − 0.001) in
      inverse_noise_scaling — ``final_sigma`` is 0.001 and ``finish`` applies that division;
    * the model is evaluated at the predictor's output; the corrector then uses that evaluation (UniC), so the
      x that ``step`` returns is the next model input while the corrected state stays inside this object;
    * no corrector on the step to the last sigma; orders 1, 2, … warm up, the last two steps use order ≤ 2, 1;
    * with one step (S = 1) ComfyUI's loop makes no update at all and returns the input latent rescaled:
      this is reproduced (and logged), as KSampler does it.

    ``step(x, denoised)`` uses the corrected state kept here and ``x`` only as the point the model saw, so ``x``
    must be exactly what ``start``/the previous ``step`` returned.
    """

    name = "uni_pc"
    variant = "bh1"

    def __init__(self, sigmas: torch.Tensor | Sequence[float]) -> None:
        super().__init__(sigmas)
        self.order = min(3, self.steps - 1)  # sample_unipc: order = min(3, len(timesteps) - 2)
        if self.order == 0:
            logger.warning("%s with 1 step: ComfyUI's uni_pc makes no update for a single step and returns the "
                           "noisy input; DualParal reproduces that. Use 2 or more steps.", self.name)
        self._ts: torch.Tensor | None = None
        self._x: torch.Tensor | None = None  # corrected state (VP space) at the last sigma reached
        self._x_in: torch.Tensor | None = None  # VP-space point of the pending model evaluation
        self._models: list[torch.Tensor] = []  # model_prev_list (x0 predictions)
        self._times: list[torch.Tensor] = []  # t_prev_list
        self._pending: tuple | None = None  # what the corrector of the update in flight needs

    @property
    def final_sigma(self) -> torch.Tensor:
        return self.sigmas[-1] if self.sigmas[-1] != 0 else torch.tensor(0.001, dtype=self.sigmas.dtype)

    def _bind(self, x: torch.Tensor) -> None:
        super()._bind(x)
        ts = self._sig.clone()
        if self.sigmas[-1] == 0:
            ts[-1] = 0.001
        self._ts = ts

    def _vec(self, k: int, x: torch.Tensor) -> torch.Tensor:
        return self._ts[k].expand(x.shape[0])

    @staticmethod
    def _model_input(x_vp: torch.Tensor, vec_t: torch.Tensor) -> torch.Tensor:
        # predict_eps_sigma: input = input * ((sigma ** 2 + 1.0) ** 0.5)
        sigma = vec_t.view(vec_t.shape[:1] + (1,) * (x_vp.ndim - 1))
        return x_vp * ((sigma ** 2 + 1.0) ** 0.5)

    def start(self, x: torch.Tensor) -> torch.Tensor:
        super().start(x)
        self._x = self._x_in = x / torch.sqrt(1.0 + self._ts[0] ** 2.0)
        return self._model_input(self._x_in, self._vec(0, x))

    def _data_prediction(self, x: torch.Tensor, denoised: torch.Tensor, vec_t: torch.Tensor) -> torch.Tensor:
        # predict_eps_sigma (eps from the model's x0), then UniPC.data_prediction_fn (x0 from eps, VP space).
        sigma = vec_t.view(vec_t.shape[:1] + (1,) * (x.ndim - 1))
        eps = (x - denoised) / sigma
        dims = x.dim()
        alpha_t, sigma_t = _alpha(vec_t), _std(vec_t)
        return (self._x_in - _expand(sigma_t, dims) * eps) / _expand(alpha_t, dims)

    def _step(self, k: int, x: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
        if self._x is None:  # start() was not called: enter VP space from the raw initial x
            self._x = self._x_in = x / torch.sqrt(1.0 + self._ts[0] ** 2.0)
        vec_t = self._vec(k, x)
        model_x = self._data_prediction(x, denoised, vec_t)
        if k == 0:
            self._models, self._times = [model_x], [vec_t]
        else:
            self._x = self._correct(model_x)
            if k < self.order:  # warm-up steps append to the history
                self._models.append(model_x)
                self._times.append(vec_t)
            else:  # then it is a window of `order` entries
                for i in range(self.order - 1):
                    self._times[i] = self._times[i + 1]
                    self._models[i] = self._models[i + 1]
                self._times[-1] = vec_t
                self._models[-1] = model_x
        if self.order == 0:  # S == 1: ComfyUI's loop only evaluates the model once and never updates x
            return self._x / _alpha(self._ts[-1])
        nxt = k + 1
        order = nxt if nxt < self.order else min(self.order, self.steps + 1 - nxt)
        use_corrector = nxt < self.steps
        vec_next = self._vec(nxt, x)
        x_pred = self._predict(self._x, vec_next, order, use_corrector)
        if not use_corrector:  # the last update: sample_unipc ends with x /= alpha(timesteps[-1])
            self._pending = self._x_in = None
            return x_pred / _alpha(self._ts[-1])
        self._x_in = x_pred
        return self._model_input(x_pred, vec_next)

    def _predict(self, x: torch.Tensor, t: torch.Tensor, order: int, use_corrector: bool) -> torch.Tensor:
        """The predictor half of ``UniPC.multistep_uni_pc_bh_update`` (predict_x0), operation for operation."""
        dims = x.dim()
        t_prev_0 = self._times[-1]
        lambda_prev_0 = _lambda(t_prev_0)
        lambda_t = _lambda(t)
        model_prev_0 = self._models[-1]
        sigma_prev_0, sigma_t = _std(t_prev_0), _std(t)
        alpha_t = torch.exp(_log_mean_coeff(t))
        h = lambda_t - lambda_prev_0

        rks, d1s = [], []
        for i in range(1, order):
            t_prev_i = self._times[-(i + 1)]
            model_prev_i = self._models[-(i + 1)]
            lambda_prev_i = _lambda(t_prev_i)
            rk = ((lambda_prev_i - lambda_prev_0) / h)[0]
            rks.append(rk)
            d1s.append((model_prev_i - model_prev_0) / rk)
        rks.append(1.)
        rks = torch.tensor(rks, device=x.device)

        hh = -h[0]
        h_phi_1 = torch.expm1(hh)  # h·phi_1(h) = e^h − 1
        h_phi_k = h_phi_1 / hh - 1
        factorial_i = 1
        b_h = hh if self.variant == "bh1" else torch.expm1(hh)
        rr, b = [], []
        for i in range(1, order + 1):
            rr.append(torch.pow(rks, i - 1))
            b.append(h_phi_k * factorial_i / b_h)
            factorial_i *= (i + 1)
            h_phi_k = h_phi_k / hh - 1 / factorial_i
        rr = torch.stack(rr)
        b = torch.tensor(b, device=x.device)

        d1 = None
        if d1s:
            d1 = torch.stack(d1s, dim=1)
            # for order 2 the published code uses a simplified rho
            rhos_p = torch.tensor([0.5], device=b.device) if order == 2 else torch.linalg.solve(rr[:-1, :-1], b[:-1])
        rhos_c = None
        if use_corrector:
            rhos_c = torch.tensor([0.5], device=b.device) if order == 1 else torch.linalg.solve(rr, b)

        x_t_ = _expand(sigma_t / sigma_prev_0, dims) * x - _expand(alpha_t * h_phi_1, dims) * model_prev_0
        # (.to: a no-op for ComfyUI's float32; lets a float64 run work, where ComfyUI's float32 rhos would fail)
        pred_res = torch.tensordot(d1, rhos_p.to(d1.dtype), dims=([1], [0])) if d1 is not None else 0
        x_t = x_t_ - _expand(alpha_t * b_h, dims) * pred_res
        self._pending = (x_t_, alpha_t, b_h, rhos_c, d1, model_prev_0) if use_corrector else None
        return x_t

    def _correct(self, model_t: torch.Tensor) -> torch.Tensor:
        """The corrector half of ``multistep_uni_pc_bh_update``, with the model's x0 at the predicted point."""
        x_t_, alpha_t, b_h, rhos_c, d1, model_prev_0 = self._pending
        self._pending = None
        dims = x_t_.dim()
        corr_res = torch.tensordot(d1, rhos_c[:-1].to(d1.dtype), dims=([1], [0])) if d1 is not None else 0
        d1_t = model_t - model_prev_0
        return x_t_ - _expand(alpha_t * b_h, dims) * (corr_res + rhos_c[-1] * d1_t)


class UniPCBH2Sampler(UniPCSampler):
    """UniPC, variant B(h) = e^h − 1: ComfyUI sampler "uni_pc_bh2" = ``sample_unipc(..., variant='bh2')``;
    everything else as ``UniPCSampler``."""

    name = "uni_pc_bh2"
    variant = "bh2"


_SAMPLERS: dict[str, type[BlockSampler]] = {
    "euler": EulerSampler,
    "uni_pc": UniPCSampler,
    "uni_pc_bh2": UniPCBH2Sampler,
    "dpmpp_2m": DPMPP2MSampler,
}


def make_sampler(name: str, sigmas: torch.Tensor | Sequence[float]) -> BlockSampler:
    """A fresh sampler of ComfyUI's name ``name`` over ``sigmas`` (1-D, steps + 1, descending)."""
    if name not in _SAMPLERS:
        raise ValueError(f"sampler_name={name!r} is not supported; choose one of {list(SAMPLER_NAMES)}.")
    return _SAMPLERS[name](sigmas)
