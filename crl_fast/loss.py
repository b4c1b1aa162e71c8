"""``contrastive_loss``: every CRL critic loss, fused, never materialising the B x M logits.

Each loss is a few lines of PyTorch over O(B) statistics from ``crl_fast.pair_stats`` plus the
positive logits ``L_ii``; autograd carries gradients through those vectors into the fused
backward (the sigmoid loss and DPO / IPO / FB / SPPO take theirs in forward:
``crl_fast.loss_with_grads``).
``crl_fast.loss_reference`` writes the same losses on the full matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal, overload

import torch
from torch import nn

from crl_fast.checks import (
    check_bool,
    is_real,
    require_triton,
    triton_available,
    triton_runs_on,
)
from crl_fast.energy import (
    ENERGY_CODES,
    check_energy,
    check_scale_and_bias,
    kernel_inputs,
    logit_scale,
)
from crl_fast.loss_with_grads import loss_with_grads
from crl_fast.pair_stats import (
    PAIR_DPO,
    PAIR_FB,
    PAIR_IPO,
    PAIR_NONE,
    PAIR_SPPO,
    PairStats,
    pair_stats,
)
from crl_fast.pair_stats_torch import softplus

LOSSES = (
    "binary",
    "infonce",
    "infonce_backward",
    "symmetric_infonce",
    "flatnce",
    "flatnce_backward",
    "dpo",
    "ipo",
    "fb",
    "sppo",
)
REDUCTIONS = ("mean", "sum", "none")
Metrics = dict[str, torch.Tensor]
"""The critic's metrics: 0-d tensors by name (``return_metrics``)."""
LossOutput = torch.Tensor | tuple[torch.Tensor, Metrics]
"""The loss, or (loss, metrics) with ``return_metrics``."""
BACKENDS = ("auto", "triton", "torch")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class LossConfig:
    """What to compute; validated on construction."""

    loss: str = "binary"
    """One of ``LOSSES``."""
    energy: str = "dot"
    """One of ``ENERGIES``: dot, l2 (-|x-y|^2), norm (-sqrt(|x-y|^2 + 1e-6)), cosine."""
    logsumexp_penalty: float = 0.0
    """Adds ``c * reduce_i(logsumexp_j L_ij)^2``, reduced like the loss (JaxGCRL: 0.1, mean)."""
    exclude_positive_from_lse: bool = False
    """Leave ``L_ii`` out of the logsumexp of the InfoNCE losses and the penalty."""
    reduction: str = "mean"
    """``mean`` over terms, their ``sum`` (SigLIP divides the binary ``sum`` by B), or ``none``:
    the B row losses, each the sum of its row's terms (column i's too, and its penalty term),
    which ``sum`` adds up."""

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        check_energy(self.energy)
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        check_bool("exclude_positive_from_lse", self.exclude_positive_from_lse)
        penalty = self.logsumexp_penalty
        if not is_real(penalty):
            raise TypeError(
                f"logsumexp_penalty must be a real number, got {type(penalty).__name__}"
            )
        # Comparisons, not math.isfinite: under torch.compile a float argument may be symbolic.
        if not 0 <= penalty < math.inf:  # NaN fails both
            raise ValueError(f"logsumexp_penalty must be a finite number >= 0, got {penalty!r}")
        if not isinstance(penalty, torch.SymFloat):  # a Fraction, numpy's: a float
            object.__setattr__(self, "logsumexp_penalty", float(penalty))

    def minimum_batch(self) -> tuple[int, int]:
        """(rows of phi, rows of psi) below which a loss term is an empty sum: off-diagonal
        row terms need two goals, off-diagonal column terms two rows of phi."""
        exclude = self.exclude_positive_from_lse
        row_lse = self.loss in ("infonce", "symmetric_infonce") or self.logsumexp_penalty > 0
        rows_off = self.loss in ("flatnce", "dpo", "ipo", "fb") or (exclude and row_lse)
        cols_off = self.loss == "flatnce_backward" or (
            exclude and self.loss in ("infonce_backward", "symmetric_infonce")
        )
        return (2 if cols_off else 1), (2 if rows_off else 1)


def _autocast(
    phi: torch.Tensor, psi: torch.Tensor, config: LossConfig
) -> tuple[torch.Tensor, torch.Tensor, LossConfig]:
    """Under ``torch.autocast``, phi and psi in the autocast dtype, as a matmul would take them
    (float64 and non-tensors are left for ``_check_inputs``), and the config to use. With the
    cosine energy they are normalised first (in float32, rounded to their own dtype) and the
    energy becomes the dot product of the unit rows, as ``F.normalize`` then an autocast matmul
    would do it: a float32 zero row's gradient (1 / eps) fits float32, not float16."""
    if not isinstance(phi, torch.Tensor) or phi.is_meta:  # left for _check_inputs
        return phi, psi, config
    if not torch.is_autocast_enabled(phi.device.type):
        return phi, psi, config
    dtype = torch.get_autocast_dtype(phi.device.type)

    def eligible(t: torch.Tensor) -> bool:  # else left as it is, for _check_inputs to name
        return (
            isinstance(t, torch.Tensor)
            and t.dtype in _TRITON_DTYPES
            and t.device == phi.device
            and t.layout == torch.strided
        )

    if config.energy == "cosine" and eligible(phi) and eligible(psi):
        phi, psi = kernel_inputs(phi, psi, "cosine")
        config = replace(config, energy="dot")
    phi, psi = (t.to(dtype) if eligible(t) else t for t in (phi, psi))
    return phi, psi, config


def _check_inputs(
    phi: torch.Tensor,
    psi: torch.Tensor,
    config: LossConfig,
    log_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> None:
    for name, t in (("phi", phi), ("psi", psi)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 2:
            raise ValueError(f"{name} must be 2-D (rows, features), got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16/bfloat16/float32/float64, got {t.dtype}")
        if t.is_meta:
            raise ValueError(f"{name} is a meta tensor: it has no values to compute a loss of")
        if t.layout != torch.strided:
            raise TypeError(f"{name} must be dense (.to_dense()), got layout {t.layout}")
    if phi.dtype != psi.dtype:
        cast = " (after autocast's cast)" if torch.is_autocast_enabled(phi.device.type) else ""
        raise TypeError(f"phi and psi must share a dtype, got {phi.dtype} and {psi.dtype}{cast}")
    if phi.device != psi.device:
        raise ValueError(f"phi and psi must be on one device, got {phi.device} and {psi.device}")
    (b, d), (m, d_psi) = phi.shape, psi.shape
    if b == 0:
        raise ValueError("empty batch: phi has 0 rows")
    if d == 0:
        raise ValueError("phi and psi have 0 features")
    if d != d_psi:
        raise ValueError(f"phi and psi feature sizes differ: {d} vs {d_psi}")
    if m < b:
        raise ValueError(
            f"psi needs at least as many rows as phi (row i of psi is the positive of row i of "
            f"phi; extra rows are negatives), got {m} < {b}"
        )
    min_b, min_m = config.minimum_batch()
    if b < min_b or m < min_m:
        raise ValueError(
            f"loss {config.loss!r} (exclude_positive_from_lse={config.exclude_positive_from_lse}) "
            f"compares off-diagonal pairs: it needs >= {min_b} rows of phi and >= {min_m} goals, "
            f"got {b} and {m}"
        )
    check_scale_and_bias(log_scale, bias, phi.device)


def _use_triton(x: torch.Tensor, backend: str) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    if backend == "triton":
        if x.dtype not in _TRITON_DTYPES:
            raise TypeError(f"the Triton backend takes float16/bfloat16/float32, got {x.dtype}")
        require_triton()
        from crl_fast.kernels import pair_stats

        if not triton_runs_on(x.device, pair_stats):
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got {x.device}), or TRITON_INTERPRET=1 set "
                "before triton is first imported (torch.compile imports it) to run the kernels "
                "on the CPU"
            )
        return True
    return x.is_cuda and x.dtype in _TRITON_DTYPES and triton_available()


_ROW_TWIN = {"infonce_backward": "infonce", "flatnce_backward": "flatnce"}
"""Column losses and the row losses they equal on the transposed logits."""

_PAIRS = {"dpo": PAIR_DPO, "ipo": PAIR_IPO, "fb": PAIR_FB, "sppo": PAIR_SPPO}
"""The pair losses' codes for the statistics (every other loss: PAIR_NONE)."""


def _online_applies(loss: str, d: int) -> bool:
    """Row-softmax losses whose only other gradient is on L_ii: the forward keeps online sums
    so that backward needs just the column pass (two passes over the logits, not three)."""
    from crl_fast.kernels.pair_stats import ONLINE_MAX_D

    return loss in ("infonce", "flatnce") and d <= ONLINE_MAX_D


@overload
def contrastive_loss(
    phi: torch.Tensor,
    psi: torch.Tensor,
    *,
    loss: str = ...,
    energy: str = ...,
    log_scale: torch.Tensor | None = ...,
    bias: torch.Tensor | None = ...,
    logsumexp_penalty: float = ...,
    exclude_positive_from_lse: bool = ...,
    reduction: str = ...,
    return_metrics: Literal[False] = ...,
    backend: str = ...,
) -> torch.Tensor: ...
@overload
def contrastive_loss(
    phi: torch.Tensor,
    psi: torch.Tensor,
    *,
    loss: str = ...,
    energy: str = ...,
    log_scale: torch.Tensor | None = ...,
    bias: torch.Tensor | None = ...,
    logsumexp_penalty: float = ...,
    exclude_positive_from_lse: bool = ...,
    reduction: str = ...,
    return_metrics: Literal[True],
    backend: str = ...,
) -> tuple[torch.Tensor, Metrics]: ...
@overload
def contrastive_loss(
    phi: torch.Tensor,
    psi: torch.Tensor,
    *,
    loss: str = ...,
    energy: str = ...,
    log_scale: torch.Tensor | None = ...,
    bias: torch.Tensor | None = ...,
    logsumexp_penalty: float = ...,
    exclude_positive_from_lse: bool = ...,
    reduction: str = ...,
    return_metrics: bool,
    backend: str = ...,
) -> LossOutput: ...
def contrastive_loss(
    phi: torch.Tensor,
    psi: torch.Tensor,
    *,
    loss: str = "binary",
    energy: str = "dot",
    log_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    logsumexp_penalty: float = 0.0,
    exclude_positive_from_lse: bool = False,
    reduction: str = "mean",
    return_metrics: bool = False,
    backend: str = "auto",
) -> LossOutput:
    """Contrastive critic loss between ``phi`` (B, d) and ``psi`` (M >= B, d).

    Row i of ``psi`` is the positive goal of row i of ``phi``; every other row is a negative
    (rows B..M-1 are extra negatives). Logits ``L_ij = exp(log_scale) * f(phi_i, psi_j) + bias``
    are never stored: extra memory is O((B + M) * d). ``backend="auto"`` runs the Triton kernels
    on CUDA and a chunked PyTorch path elsewhere; ``"triton"`` forces the kernels (on CPU only
    under ``TRITON_INTERPRET=1``). With ``return_metrics`` also returns a dict of 0-d tensors:
    categorical_accuracy, binary_accuracy, logits_pos, logits_neg, logsumexp_sq. Under
    ``torch.autocast`` float16/bfloat16/float32 inputs are cast to the autocast dtype first
    (cosine: normalised in their own dtype before).
    The loss is float32 (float64 for float64 inputs), 0-d, or (B,) row losses with
    ``reduction="none"``; ``symmetric_infonce`` is the sum of both directions (CLIP's loss is
    half of it), and the column losses read the first B rows of psi.
    """
    config = LossConfig(loss, energy, logsumexp_penalty, exclude_positive_from_lse, reduction)
    phi, psi, config = _autocast(phi, psi, config)
    _check_inputs(phi, psi, config, log_scale, bias)
    return _output(*_contrastive_loss(phi, psi, config, log_scale, bias, return_metrics, backend))


def _output(value: torch.Tensor, metrics: Metrics | None) -> LossOutput:
    return value if metrics is None else (value, metrics)


def _contrastive_loss(
    phi: torch.Tensor,
    psi: torch.Tensor,
    config: LossConfig,
    log_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    return_metrics: bool,
    backend: str,
) -> tuple[torch.Tensor, Metrics | None]:
    """The loss, and the metrics if ``return_metrics`` (else None), of checked inputs."""
    check_bool("return_metrics", return_metrics)
    name = config.loss
    use_triton = _use_triton(phi, backend)
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (phi, psi, log_scale, bias)
    )
    if wants_grad and not torch.compiler.is_compiling():
        # Made under inference_mode, phi and psi cannot be saved for backward, which a learned
        # scale or bias needs; eager PyTorch takes them, so take copies.
        phi, psi = (t.clone() if t.is_inference() else t for t in (phi, psi))
    if return_metrics and _metrics_apart(config, wants_grad, use_triton, psi.shape[0]):
        # Computed as without metrics, so the loss and gradients are the same bit for bit.
        value, _ = _contrastive_loss(phi, psi, config, log_scale, bias, False, backend)
        with torch.no_grad():
            x, y, scale, shift = _kernel_args(phi, psi, config, log_scale, bias)
            return value, _metrics_pass(x, y, scale, shift, config, use_triton)
    if name in _ROW_TWIN and not (config.logsumexp_penalty or return_metrics):
        psi = psi[: phi.shape[0]]  # extra negatives are columns that no column-loss term reads
    b, m = phi.shape[0], psi.shape[0]
    plain = wants_grad and not (config.logsumexp_penalty or return_metrics)
    if name in _ROW_TWIN and b == m and use_triton and plain:
        # A square batch's column loss is the row loss of the transposed problem (every energy
        # is symmetric), whose forward keeps online row sums: two passes, not three.
        twin = replace(config, loss=_ROW_TWIN[name])
        return _contrastive_loss(psi, phi, twin, log_scale, bias, False, backend)

    x, y, scale, shift = _kernel_args(phi, psi, config, log_scale, bias)
    energy = ENERGY_CODES[config.energy]
    pair = _PAIRS.get(name, PAIR_NONE)
    if _fused(config, use_triton, m) and plain:
        return loss_with_grads(
            x, y, scale, shift, energy=energy, pair=pair, mean=config.reduction == "mean",
            use_triton=use_triton,
        ), None  # fmt: skip

    flat = name in ("flatnce", "flatnce_backward")
    # An ``if``, not ``|=``: under torch.compile the penalty may be symbolic, and torch 2.11's
    # dynamo wrote ``True |= (penalty > 0)`` into its graph (a SyntaxError).
    want_row_lse = name in ("infonce", "symmetric_infonce", "flatnce") or return_metrics
    if config.logsumexp_penalty > 0:
        want_row_lse = True
    want_col_lse = name in ("infonce_backward", "symmetric_infonce", "flatnce_backward")
    # Off-diagonal sums are computed directly; the full logsumexp is logaddexp(off, L_ii).
    mask_diag = config.exclude_positive_from_lse or flat
    stats = pair_stats(
        x, y, scale, shift, energy=energy,
        row_lse=want_row_lse, col_lse=want_col_lse, mask_diag=mask_diag,
        softplus=name == "binary", pair=pair, metrics=return_metrics,
        # the online sums serve dx and (dscale, dbias) only: not for a frozen phi's loss
        online=use_triton and _online_applies(name, x.shape[1]) and wants_grad
        and any(t.requires_grad for t in (x, scale, shift)),
        use_triton=use_triton,
    )  # fmt: skip
    pos = stats.pos

    def lse_less_pos(rel: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """The logsumexp the loss asks for less L_ii, given what the kernel computed (with or
        without L_ii, less its offset: see PairStats). ``offset - L_ii`` comes first, exact
        for near values: at logits in the thousands a float32 logsumexp of 1e4 is 2**-11 off,
        and so would InfoNCE's row (or a logaddexp's weight of L_ii) be."""
        gap = offset - pos
        if mask_diag and not config.exclude_positive_from_lse:
            return gap + torch.logaddexp(rel, -gap)
        return gap + rel

    # Read only where want_row_lse holds (the InfoNCE rows, the penalty, the metrics); else empty.
    row_gap = lse_less_pos(stats.row_lse, stats.row_max) if want_row_lse else stats.row_lse
    row_lse = pos + row_gap if want_row_lse else stats.row_lse
    # Row i's terms (its pairs', its row's, column i's) and how many terms "mean" divides by.
    if name == "binary":
        # softplus(-L_ii), not softplus(L_ii) - L_ii: no cancellation for confident positives
        rows, terms = stats.row_softplus + softplus(-pos), b * m
    elif name == "infonce":
        rows, terms = row_gap, b
    elif name == "infonce_backward":
        rows, terms = lse_less_pos(stats.col_lse[:b], stats.col_max[:b]), b
    elif name == "symmetric_infonce":
        rows, terms = row_gap + lse_less_pos(stats.col_lse[:b], stats.col_max[:b]), b
    elif flat:
        if name == "flatnce":
            rel, offset = stats.row_lse, stats.row_max
        else:
            rel, offset = stats.col_lse[:b], stats.col_max[:b]
        c = (offset - pos) + rel
        # exp(c - stopgrad(c)) without exp: the same value (1) and gradient (dc), and nothing
        # saved for backward, so per-row losses can be masked in place (rows[pad] = 0)
        rows, terms = 1 + (c - c.detach()), b
    elif name == "fb":  # -L_ii plus the mean over the row's M - 1 others of L_ij^2 / 2
        rows, terms = stats.row_pair / (m - 1) - pos, b
    elif name == "sppo":  # (L_ij + 1)^2 off the diagonal, M (L_ii - 1)^2 on it
        rows, terms = stats.row_pair + m * (pos - 1).square(), b * m
    else:  # dpo, ipo: over the M - 1 off-diagonal pairs of each row
        rows, terms = stats.row_pair, b * (m - 1)
    # The penalty's B terms, reduced on their own.
    penalty = config.logsumexp_penalty * row_lse.square() if config.logsumexp_penalty else None
    if config.reduction == "none":
        value = rows if penalty is None else rows + penalty
    elif config.reduction == "sum":
        value = rows.sum() if penalty is None else rows.sum() + penalty.sum()
    else:
        value = rows.sum() / terms if penalty is None else rows.sum() / terms + penalty.mean()
    return value, (_metrics(stats, row_lse, m) if return_metrics else None)


def _fused(config: LossConfig, use_triton: bool, m: int) -> bool:
    """Whether the loss is a scalar whose gradient needs no statistic first, so that its forward
    computes it (two passes in all): the sigmoid loss, and DPO / IPO / FB / SPPO on the Triton
    path."""
    if config.reduction == "none":  # per-row weights come only with the backward's gradient
        return False
    return config.loss == "binary" or (config.loss in _PAIRS and use_triton and m > 1)


def _metrics_apart(config: LossConfig, wants_grad: bool, use_triton: bool, m: int) -> bool:
    """Whether the metrics come from a pass of their own: for the losses whose own passes
    compute no row logsumexp (the fused losses with gradients, the column losses), so that
    their loss and gradients are those computed without metrics. With the penalty every loss
    computes the row logsumexp, and the metrics come with it."""
    if config.logsumexp_penalty:
        return False
    return config.loss in _ROW_TWIN or (wants_grad and _fused(config, use_triton, m))


def _kernel_args(
    phi: torch.Tensor,
    psi: torch.Tensor,
    config: LossConfig,
    log_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows the kernels multiply, the logit scale and the bias (0-d)."""
    x, y = kernel_inputs(phi, psi, config.energy)
    one = x.new_ones((), dtype=torch.float32)
    scale = one if log_scale is None else logit_scale(log_scale)
    shift = one * 0 if bias is None else bias.reshape(())
    return x, y, scale, shift


def _metrics_pass(
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    config: LossConfig,
    use_triton: bool,
) -> dict[str, torch.Tensor]:
    """The metrics from a pass over the logits of their own (``_kernel_args``; the caller
    runs it under ``torch.no_grad``)."""
    stats = pair_stats(
        x, y, scale, shift, energy=ENERGY_CODES[config.energy], row_lse=True, col_lse=False,
        mask_diag=config.exclude_positive_from_lse, softplus=False, pair=PAIR_NONE,
        metrics=True, online=False, use_triton=use_triton,
    )  # fmt: skip
    return _metrics(stats, stats.row_max + stats.row_lse, y.shape[0])


@torch.no_grad()
def _metrics(stats: PairStats, row_lse: torch.Tensor, m: int) -> dict[str, torch.Tensor]:
    """The critic's metrics (0-d tensors) from statistics computed with ``metrics=True`` over
    ``m`` columns; ``row_lse``: the logsumexp the loss uses (with or without the positive)."""
    pos = stats.pos
    b = pos.shape[0]
    rows = torch.arange(b, device=pos.device)
    negatives = b * m - b
    return {
        "categorical_accuracy": (stats.row_argmax == rows).float().mean(),
        "binary_accuracy": stats.row_correct.sum() / (b * m),
        "logits_pos": pos.mean(),
        "logits_neg": (stats.row_sum.sum() - pos.sum()) / negatives
        if negatives
        else pos.new_full((), float("nan")),
        "logsumexp_sq": row_lse.square().mean(),
    }


class ContrastiveLoss(nn.Module):
    """``contrastive_loss`` as a module, with a logit scale and bias.

    ``init_log_scale`` and ``init_bias`` are their values: parameters with ``learn_scale`` /
    ``learn_bias``, fixed buffers otherwise (left out when 0, CRL's default), of shape (1,), as
    FSDP needs. SigLIP learns both from ``log_scale = log(10)`` and ``bias = -10``. Built on
    the meta device (deferred initialisation, FSDP's), ``to_empty`` then ``reset_parameters``
    restores those values.
    ``device`` and ``dtype`` make them there, as torch's modules take them: built in float32
    and moved by ``.to(torch.float64)``, they hold the init values rounded to float32.
    """

    log_scale: torch.Tensor | None
    bias: torch.Tensor | None
    init_log_scale: float
    init_bias: float

    def __init__(
        self,
        loss: str = "binary",
        energy: str = "dot",
        *,
        logsumexp_penalty: float = 0.0,
        exclude_positive_from_lse: bool = False,
        reduction: str = "mean",
        learn_scale: bool = False,
        init_log_scale: float = 0.0,
        learn_bias: bool = False,
        init_bias: float = 0.0,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.config = LossConfig(
            loss, energy, logsumexp_penalty, exclude_positive_from_lse, reduction
        )
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        # an integer dtype would truncate log(10) to 2
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        for name, value, learn in (
            ("log_scale", init_log_scale, learn_scale),
            ("bias", init_bias, learn_bias),
        ):
            check_bool(f"learn_{'scale' if name == 'log_scale' else name}", learn)
            if not is_real(value):  # a string would pass float(): "1" is not a number
                raise TypeError(f"init_{name} must be a real number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"init_{name} must be finite, got {value}")
            setattr(self, f"init_{name}", float(value))
            empty = torch.empty(1, device=device, dtype=dtype)  # FSDP refuses 0-d parameters
            if learn:
                self.register_parameter(name, nn.Parameter(empty))
            else:
                self.register_buffer(name, empty if value != 0 else None)
        self.reset_parameters()

    def _load_from_state_dict(
        self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        """A state saved while the scale and bias were 0-d loads into their shape, (1,)."""
        for name in ("log_scale", "bias"):
            value = state_dict.get(prefix + name)
            if isinstance(value, torch.Tensor) and value.ndim == 0:
                state_dict[prefix + name] = value.reshape(1)  # load_state_dict's own copy
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def reset_parameters(self) -> None:
        """Set the scale and bias to ``init_log_scale`` and ``init_bias``: after ``to_empty``
        they hold whatever the memory held (FSDP calls this on a module built on meta)."""
        with torch.no_grad():
            for name in ("log_scale", "bias"):
                t = getattr(self, name)
                if t is not None:
                    t.fill_(getattr(self, f"init_{name}"))

    @overload
    def forward(
        self, phi: torch.Tensor, psi: torch.Tensor, return_metrics: Literal[False] = ...
    ) -> torch.Tensor: ...
    @overload
    def forward(
        self, phi: torch.Tensor, psi: torch.Tensor, return_metrics: Literal[True]
    ) -> tuple[torch.Tensor, Metrics]: ...
    @overload
    def forward(self, phi: torch.Tensor, psi: torch.Tensor, return_metrics: bool) -> LossOutput: ...
    def forward(
        self, phi: torch.Tensor, psi: torch.Tensor, return_metrics: bool = False
    ) -> LossOutput:
        """The loss of ``phi`` against ``psi`` as :func:`contrastive_loss` computes it, with
        this module's options, scale and bias; with ``return_metrics`` also the metrics dict."""
        phi, psi, config = _autocast(phi, psi, self.config)
        _check_inputs(phi, psi, config, self.log_scale, self.bias)
        return _output(
            *_contrastive_loss(
                phi, psi, config, self.log_scale, self.bias, return_metrics, self.backend
            )
        )

    if TYPE_CHECKING:  # torch types nn.Module.__call__ (which runs forward) as returning Any
        __call__ = forward

    def extra_repr(self) -> str:
        c = self.config
        parts = [f"loss={c.loss!r}, energy={c.energy!r}, reduction={c.reduction!r}"]
        if c.logsumexp_penalty:
            parts.append(f"logsumexp_penalty={c.logsumexp_penalty}")
        if c.exclude_positive_from_lse:
            parts.append("exclude_positive_from_lse=True")
        for name in ("log_scale", "bias"):
            t = getattr(self, name)
            if t is not None:  # a host read: printing a module is no hot path
                learned = " (learned)" if isinstance(t, nn.Parameter) else ""
                value = "meta" if t.is_meta else f"{t.item():.4g}"
                parts.append(f"{name}={value}{learned}")
        return ", ".join(parts)
