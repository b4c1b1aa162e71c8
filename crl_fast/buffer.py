"""GPU-resident trajectory ring buffer with geometric future-goal sampling.

All ``num_envs`` environments write in lockstep into tensors shaped ``[capacity, num_envs, ...]``;
step ``s`` of every env lands in row ``s % capacity`` (a true ring: nothing is copied or rolled).
Row ``t`` of an env holds ``(s_t, a_t, ag(s_{t+1}), terminated_t, truncated_t)``.

Goals for an anchor ``t`` are ``ag(s_{t+k})``, read from row ``t + k - 1``, with ``k`` in
``1..L`` and ``L = last - t + 1`` where ``last`` is the final row of ``t``'s episode (the newest
stored row while the episode runs). ``k`` is drawn directly by inverse CDF, so a call costs
O(batch) work and memory (JaxGCRL builds a T x T matrix per env instead), reads no host state and
always has the same shapes: it can sit inside a CUDA graph.

Episode bookkeeping is O(1) per row: each row stores the absolute index of its episode within
its env, and ``segment_end[e % capacity, env]`` holds the last absolute step of episode ``e``
(-1 while it runs). Slot ``e % capacity`` is reused only by episode ``e + capacity``, which
starts at least ``capacity`` steps after ``e`` ended, when every row of ``e`` has been
overwritten; and a goal row is never older than its anchor, so any stored anchor has its whole
future stored.
"""

from __future__ import annotations

import math
import operator
import struct
import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import torch

from crl_fast.checks import (
    fraction,
    generator_state,
    is_real,
    positive_int,
    require_triton,
    resolve_device,
    seed_int,
    triton_available,
    triton_runs_on,
)

GOAL_MODES = ("geometric", "clamp", "uniform_future", "final")
"""Future-goal offset laws; their index is the mode id the kernels use."""

_SAMPLING_LAW = ("gamma", "goal_mode", "random_goal_fraction", "current_goal_fraction")
"""Config fields that states saved before 2026-11-28 lack; such states load unchecked on them."""
_FLOAT_FIELDS = ("observation", "action", "next_achieved_goal")
_FLAG_FIELDS = ("terminated", "truncated")
_MAX_CAPACITY = 2**24
"""Steps per env: a uniform_future offset over that many steps still gets 2**14 of the 2**38
offset uniforms (each offset's probability exact to 6e-5 of itself)."""
_BITS_HIGH = 2**62  # random int64 draws lie in [0, 2**62)


class GoalBatch(NamedTuple):
    """One sample: observation [B, obs_dim], action [B, action_dim], goal [B, goal_dim]."""

    observation: torch.Tensor
    action: torch.Tensor
    goal: torch.Tensor


def _f32(x: float) -> float:
    """``x`` rounded to float32, so the torch and Triton paths use identical constants."""
    return struct.unpack("f", struct.pack("f", x))[0]


def _f32_pair(x: float) -> tuple[float, float]:
    """``x`` as float32 ``(hi, lo)`` with ``hi + lo`` = ``x`` to about 2**-48 of it: a float64
    for a Triton kernel, whose float arguments are float32."""
    hi = _f32(x)
    return hi, _f32(x - hi)


def sample_reference(
    bits: torch.Tensor,
    step: torch.Tensor,
    segment: torch.Tensor,
    segment_end: torch.Tensor,
    rows: torch.Tensor,
    *,
    widths: tuple[int, int, int],
    mode: int,
    log_gamma: tuple[float, float],
    th_rand: float,
    th_cur: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch reference for :func:`crl_fast.kernels.goal_sampling.sample` (same arguments).

    Defines the maths: anchor uniform over stored (row, env) pairs; offset by inverse CDF of
    the chosen law on ``1..L`` (log gamma = the float32 pair ``log_gamma``'s sum, the float64
    log of gamma to about 2**-48) from a 38-bit uniform, in float64; then
    the mixing overrides, from a 24-bit one. Float64 keeps every offset's probability to about
    2**-37 absolute, at any episode length and gamma: in float32 (as before 2026-12-06, with 24
    bits) a long episode's far offsets were never drawn and its near ones off by up to 5%
    (gamma = 0.9999, L = 1e5: 1e-3 of the law misplaced; uniform_future, L = 1e6: 1e-2).
    """
    cap, n = segment.shape
    step = step[0]
    size = step.clamp(max=cap)
    oldest = step - size
    total = (size * n).clamp(min=1)
    r0, r1, r2 = bits.unbind(1)

    idx = r0 % total
    env = idx % n
    t = oldest + idx // n
    anchor = (t % cap) * n + env  # flat (row, env) index
    seg = torch.take(segment, anchor)
    end = torch.take(segment_end, (seg % cap) * n + env)
    end = torch.where(end < 0, step - 1, end)
    len_d = (end - t + 1).double()

    u = (r2 & (2**38 - 1)).double() * 2.0**-38
    u_mix = ((r2 >> 38) & 0xFFFFFF).float() * 2.0**-24
    lg = log_gamma[0] + log_gamma[1]  # exact in float64
    if mode == 0:  # geometric, truncated at L and renormalised
        # log(1 - u (1 - gamma^L)), as log1p/expm1: no cancellation for gamma near 1.
        j = torch.log1p(u * torch.expm1(len_d * lg)) / lg
    elif mode == 1:  # untruncated geometric, clamped to L
        j = torch.log1p(-u) / lg
    elif mode == 2:  # uniform on 1..L
        j = u * len_d
    else:  # final
        j = len_d
    j = torch.minimum(j, len_d - 1.0)
    target_t = t + j.long()

    target_env = env
    if th_cur > th_rand:
        has_prev = t - 1 >= oldest
        prev = torch.where(has_prev, t - 1, t)
        same = torch.take(segment, (prev % cap) * n + env) == seg
        cur_t = torch.where(has_prev & same, prev, t)
        target_t = torch.where(u_mix < th_cur, cur_t, target_t)
    if th_rand > 0:
        ridx = r1 % total
        is_rand = u_mix < th_rand
        target_t = torch.where(is_rand, oldest + ridx // n, target_t)
        target_env = torch.where(is_rand, ridx % n, env)

    a_w, b_w, _ = widths
    flat_rows = rows.view(cap * n, -1)
    anchor_rows = flat_rows.index_select(0, anchor)
    target_rows = flat_rows.index_select(0, (target_t % cap) * n + target_env)
    return (
        anchor_rows[:, :a_w].contiguous(),
        anchor_rows[:, a_w : a_w + b_w].contiguous(),
        target_rows[:, a_w + b_w :].contiguous(),
    )


def _reshape_hint(shape: torch.Size, want: int, num_envs: int) -> str:
    """The reshape that turns a field shaped ``shape`` into ``want`` dims where one obviously
    does: a dim short is one step if it leads with ``num_envs`` rows, else, with one env, that
    env's steps (a flat dataset: unsqueeze(0) would make its T rows T envs); extra dims (pixels,
    [T, N, 1] flags) flatten into the last."""
    got = len(shape)
    if got == want - 1 and got and shape[0] == num_envs:
        return " (one step: x.unsqueeze(0))"
    if got == want - 1 and got and num_envs == 1:
        return " (T steps of one env: x.unsqueeze(1))"
    if got > want:
        return f" (flatten the trailing dims: x.flatten({want - 1}))"
    return ""


def _dataset_rows(fields: Mapping[str, Any]) -> int:
    """The row count N of :meth:`TrajectoryBuffer.from_dataset`'s fields, after checking their
    types and shapes ([N, dim] values, [N] flags; read from the arrays, nothing copied)."""
    rows = None
    for name, x in fields.items():
        if not isinstance(x, (torch.Tensor, np.ndarray)):
            raise TypeError(
                f"from_dataset(): {name} must be a torch.Tensor or numpy array, got "
                f"{type(x).__name__}"
            )
        shape = list(x.shape)
        if name in _FLAG_FIELDS and len(shape) != 1:
            raise ValueError(f"from_dataset(): {name} must be shaped [N], got {shape}")
        if name not in _FLAG_FIELDS and len(shape) != 2:
            hint = " (flatten the trailing dims: x.reshape(len(x), -1))" if len(shape) > 2 else ""
            raise ValueError(f"from_dataset(): {name} must be shaped [N, dim]{hint}, got {shape}")
        if rows is None:
            rows = shape[0]
        elif shape[0] != rows:
            raise ValueError(f"from_dataset(): {name} has {shape[0]} rows, observation {rows}")
    if not rows:
        raise ValueError("from_dataset(): data has no rows")
    return rows


def _dataset_tensor(name: str, x: torch.Tensor | np.ndarray, *, flag: bool) -> torch.Tensor:
    """A field of :meth:`TrajectoryBuffer.from_dataset` as a tensor (a numpy array's memory
    shared, not copied), if it holds real numbers; a flag's, if they are all 0 or 1 (a host
    read: loading is rare), as bools."""
    if isinstance(x, np.ndarray):
        with warnings.catch_warnings():  # read-only arrays (np.load's memmaps): only read here
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            x = torch.from_numpy(x)
    if x.dtype == torch.bool and flag:
        return x
    if x.dtype == torch.bool or x.is_complex():
        what = "bools or 0 / 1 numbers" if flag else "real numbers"
        raise TypeError(f"from_dataset(): {name} must hold {what}, got {x.dtype}")
    if flag and not bool(((x == 0) | (x == 1)).all()):
        raise ValueError(f"from_dataset(): {name} must hold only 0 and 1 (or bools)")
    return x != 0 if flag else x


STORAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
"""The dtypes a buffer stores its rows in: the ones tested on both samplers. (torch's other
floating dtypes include packed float4 pairs and sign-less float8, which no sampler can copy.)"""


def check_goal_mix(random_fraction: float, current_fraction: float) -> tuple[float, float]:
    """The fractions of random and of current-state goals, if each lies in [0, 1] and they sum
    to at most 1 in float32, as the samplers' thresholds do (0.2 + 0.8 from float32 values is
    1 + 1.5e-8 in float64); else a ValueError naming them."""
    r = fraction("random_goal_fraction", random_fraction)
    c = fraction("current_goal_fraction", current_fraction)
    if _f32(r + c) > 1.0:
        raise ValueError(
            f"random_goal_fraction + current_goal_fraction must be at most 1, got {r} + {c} = "
            f"{r + c}"
        )
    return r, c


class TrajectoryBuffer:
    """Ring buffer of lockstep trajectories that samples ``(obs, action, goal)`` on device.

    Goal modes: ``"geometric"`` (k ~ Geometric(1 - gamma) truncated at the episode end and
    renormalised: CRL's law; README, "Differences from JaxGCRL", for how JaxGCRL's sampler
    departs from it), ``"clamp"`` (OGBench: min(t + k, last)), ``"uniform_future"``
    (HER 'future'), ``"final"``. A fraction ``random_goal_fraction`` of goals is instead the
    achieved goal of a random stored row (rho(g)), and ``current_goal_fraction`` that of the
    anchor's own state ``ag(s_t)`` (read from row ``t - 1``; at an episode's first stored row,
    where ``ag(s_t)`` is not stored, ``ag(s_{t+1})`` stands in). Each goal is mixed in with its
    fraction's probability, independently: a batch's count is binomial, not a fixed share.

    On CUDA (``backend="auto"``, Triton installed; else PyTorch) ``sample`` is two launches (a
    ``torch.randint`` draw, then one Triton kernel) and ``extend`` one Triton launch;
    ``backend="torch"`` or ``"triton"`` forces a path (Triton on CPU tensors needs
    TRITON_INTERPRET=1).
    To capture ``sample`` in a CUDA graph with the buffer's own ``generator``, register it with
    the graph (``CUDAGraph.register_generator_state``) or pass the default generator.
    """

    def __init__(
        self,
        *,
        capacity: int,
        num_envs: int,
        obs_dim: int,
        action_dim: int,
        goal_dim: int,
        gamma: float = 0.99,
        goal_mode: str = "geometric",
        random_goal_fraction: float = 0.0,
        current_goal_fraction: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        seed: int | None = None,
        backend: str = "auto",
    ) -> None:
        capacity = positive_int("capacity", capacity)
        num_envs = positive_int("num_envs", num_envs)
        obs_dim = positive_int("obs_dim", obs_dim)
        action_dim = positive_int("action_dim", action_dim)
        goal_dim = positive_int("goal_dim", goal_dim)
        if capacity > _MAX_CAPACITY:
            raise ValueError(f"capacity must be at most 2**24 steps per env, got {capacity}")
        if not is_real(gamma):
            raise TypeError(f"gamma must be a real number, got {type(gamma).__name__}")
        if not 0.0 < gamma < 1.0:
            raise ValueError(f"gamma must lie in (0, 1), got {gamma}")
        if dtype not in STORAGE_DTYPES:
            names = ", ".join(str(d).removeprefix("torch.") for d in STORAGE_DTYPES)
            raise TypeError(f"dtype must be one of {names}, got {dtype!r}")
        if backend not in ("auto", "torch", "triton"):
            raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
        self._capacity = capacity
        self.num_envs = num_envs
        self.obs_dim, self.action_dim, self.goal_dim = obs_dim, action_dim, goal_dim
        self._gamma = float(gamma)
        self.goal_mode = self._check_mode(goal_mode)
        self.random_goal_fraction, self.current_goal_fraction = check_goal_mix(
            random_goal_fraction, current_goal_fraction
        )
        self.device = resolve_device(device)
        self.dtype = dtype
        # The kernels copy rows in bounded chunks of columns: any width takes the Triton path.
        cuda = self.device.type == "cuda"
        self._use_triton = backend == "triton" or (
            backend == "auto" and cuda and triton_available()
        )
        if self._use_triton:
            require_triton()
            from crl_fast.kernels import goal_sampling

            if not triton_runs_on(self.device, goal_sampling):
                raise ValueError(
                    f"backend='triton' needs a CUDA device (got {self.device}), or "
                    "TRITON_INTERPRET=1 set before triton is first imported (torch.compile "
                    "imports it)"
                )
        self._log_gamma = _f32_pair(math.log(gamma))

        width = obs_dim + action_dim + goal_dim
        kw: dict[str, Any] = {"device": self.device}
        # Packed rows [obs | action | next_achieved_goal]: one write per extend, 2 gathers a sample.
        self._rows = torch.zeros(capacity, num_envs, width, dtype=dtype, **kw)
        self._terminated = torch.zeros(capacity, num_envs, dtype=torch.bool, **kw)
        self._truncated = torch.zeros(capacity, num_envs, dtype=torch.bool, **kw)
        # Episode bookkeeping ("segment": an episode as its env's rows hold it; module docstring):
        # each row's absolute episode index, each episode's last step by slot, the running one.
        self._segment = torch.zeros(capacity, num_envs, dtype=torch.int64, **kw)
        self._segment_end = torch.full((capacity, num_envs), -1, dtype=torch.int64, **kw)
        self._open_segment = torch.zeros(num_envs, dtype=torch.int64, **kw)
        self._step_t = torch.zeros(1, dtype=torch.int64, **kw)
        self._step = 0  # host mirror of _step_t, known from extend without syncing
        self.generator = torch.Generator(device=self.device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed_int(seed))

    @classmethod
    def from_dataset(
        cls, data: Mapping[str, Any], *, num_envs: int = 1, **kwargs: Any
    ) -> TrajectoryBuffer:
        """A buffer holding exactly a flat dataset of episodes stored one after the other (as
        OGBench and D4RL store them), ready to sample: the offline way in.

        ``data`` maps ``observation`` [N, obs_dim], ``action`` [N, action_dim],
        ``next_achieved_goal`` [N, goal_dim] (``ag(s_{t+1})`` of each row) and ``terminated``
        and / or ``truncated`` [N] (set on an episode's last row; one left out is all False),
        torch tensors or numpy arrays: values are cast to ``dtype``, flags are bools or 0 / 1
        numbers (OGBench's float ``terminals``). The rows fill ``num_envs`` columns of
        N / num_envs steps in order (a flat array reshaped to [T, N, ...] for :meth:`extend`
        would put consecutive rows in different envs); more than one column is needed above
        2**24 rows, and a column boundary cuts an episode in two, whose goals stay in each
        piece. The last row of each column ends its episode (:meth:`end_episodes`), so a later
        ``extend`` starts new ones. Other keywords go to the constructor (``gamma``,
        ``goal_mode``, ``device``, ``dtype``, ``seed``, ...).
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"from_dataset() takes a mapping of arrays, got {type(data).__name__}")
        num_envs = positive_int("num_envs", num_envs)
        missing = [k for k in _FLOAT_FIELDS if k not in data]
        if missing:
            raise ValueError(f"from_dataset(): data is missing fields {missing}")
        flags = [k for k in _FLAG_FIELDS if k in data]
        if not flags:
            raise ValueError(
                "from_dataset(): data needs terminated or truncated, set on each episode's last row"
            )
        fields = {k: data[k] for k in _FLOAT_FIELDS + tuple(flags)}
        rows = _dataset_rows(fields)
        if rows % num_envs:
            raise ValueError(
                f"from_dataset(): {rows} rows do not split into {num_envs} columns (num_envs): "
                f"drop the last {rows % num_envs} or take a num_envs that divides {rows}"
            )
        if rows // num_envs > _MAX_CAPACITY:
            raise ValueError(
                f"from_dataset(): a buffer holds at most 2**24 rows per column: num_envs="
                f"{-(-rows // _MAX_CAPACITY)} or more (dividing {rows}) for {rows} rows"
            )
        steps = rows // num_envs
        obs_dim, action_dim, goal_dim = (fields[k].shape[1] for k in _FLOAT_FIELDS)
        buf = cls(
            capacity=steps, num_envs=num_envs, obs_dim=obs_dim, action_dim=action_dim,
            goal_dim=goal_dim, **kwargs,
        )  # fmt: skip
        batch = {
            k: torch.zeros(steps, num_envs, dtype=torch.bool, device=buf.device)
            for k in _FLAG_FIELDS
        }
        for name, x in fields.items():
            x = _dataset_tensor(name, x, flag=name in _FLAG_FIELDS)
            x = x.to(device=buf.device, dtype=torch.bool if name in flags else buf.dtype)
            batch[name] = x.reshape(num_envs, steps, *x.shape[1:]).transpose(0, 1)
        buf._extend(batch, kernel=False)  # a column's N rows: no one program walking them
        buf.end_episodes()
        return buf

    @property
    def capacity(self) -> int:
        """Steps kept per env; the buffer holds ``capacity * num_envs`` transitions."""
        return self._capacity

    @property
    def gamma(self) -> float:
        """Discount of the geometric offset law (fixed: the samplers read its log, made once as a
        float32 pair whose sum is the float64 log)."""
        return self._gamma

    def __len__(self) -> int:
        return min(self._step, self._capacity) * self.num_envs

    @staticmethod
    def _check_mode(mode: str) -> str:
        if mode not in GOAL_MODES:
            raise ValueError(f"goal_mode must be one of {GOAL_MODES}, got {mode!r}")
        return mode

    def _check_batch(self, batch: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        if not isinstance(batch, Mapping):
            raise TypeError(f"extend() takes a mapping of tensors, got {type(batch).__name__}")
        missing = [k for k in _FLOAT_FIELDS + _FLAG_FIELDS if k not in batch]
        if missing:
            raise ValueError(f"extend() batch is missing fields {missing}")
        out = []
        steps = None
        dims = (self.obs_dim, self.action_dim, self.goal_dim, None, None)
        for name, dim in zip(_FLOAT_FIELDS + _FLAG_FIELDS, dims, strict=True):
            x = batch[name]
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"extend(): {name} must be a torch.Tensor, got {type(x).__name__}")
            want_dtype = torch.bool if dim is None else self.dtype
            if x.dtype != want_dtype:
                raise TypeError(f"extend(): {name} must have dtype {want_dtype}, got {x.dtype}")
            if x.device != self.device:
                raise ValueError(f"extend(): {name} is on {x.device}, the buffer on {self.device}")
            ndim, layout = (2, "[T, num_envs]") if dim is None else (3, "[T, num_envs, dim]")
            if x.dim() != ndim:
                hint = _reshape_hint(x.shape, ndim, self.num_envs)
                raise ValueError(
                    f"extend(): {name} must be shaped {layout}{hint}, got {list(x.shape)}"
                )
            if steps is None:
                steps = x.shape[0]
            want = (steps, self.num_envs) + (() if dim is None else (dim,))
            if tuple(x.shape) != want:
                raise ValueError(
                    f"extend(): {name} must be shaped {layout} = {list(want)}, got {list(x.shape)}"
                )
            out.append(x)
        return out

    @torch.no_grad()
    def extend(self, batch: Mapping[str, torch.Tensor]) -> None:
        """Append ``T`` steps of all envs: fields shaped ``[T, num_envs, ...]`` (flags ``[T, N]``).

        Fields: ``observation``, ``action``, ``next_achieved_goal`` (buffer dtype),
        ``terminated``, ``truncated`` (bool). If ``T > capacity`` only the last ``capacity``
        steps are kept. The buffer stores values: inputs that require grad leave no autograd
        history in it. No host synchronisation.
        """
        self._extend(batch, kernel=self._use_triton)

    def _extend(self, batch: Mapping[str, torch.Tensor], *, kernel: bool) -> None:
        """:meth:`extend` through the Triton kernel or (``kernel=False``) the torch ops, which run
        each env's steps in parallel where a kernel program walks them in order."""
        obs, act, nag, term, trunc = self._check_batch(batch)
        steps = obs.shape[0]
        if steps == 0:
            return
        if kernel:
            from crl_fast.kernels import goal_sampling

            goal_sampling.extend(
                obs, act, nag, term, trunc, self._rows, self._terminated, self._truncated,
                self._segment, self._segment_end, self._open_segment, self._step_t,
                step0=self._step,
            )  # fmt: skip
        else:
            self._extend_torch(obs, act, nag, term, trunc)
        self._step += steps

    def _extend_torch(
        self,
        obs: torch.Tensor,
        act: torch.Tensor,
        nag: torch.Tensor,
        term: torch.Tensor,
        trunc: torch.Tensor,
    ) -> None:
        cap, steps = self._capacity, obs.shape[0]
        done = (term | trunc).long()
        segment = self._open_segment + done.cumsum(0) - done  # absolute episode of each row
        self._open_segment += done.sum(0)
        keep = min(steps, cap)  # older steps of this call would be overwritten by newer ones
        first = self._step + steps - keep  # absolute step of the first kept row
        kept = slice(steps - keep, steps)
        slot = segment[kept] % cap
        abs_step = torch.arange(first, first + keep, device=self.device).unsqueeze(1)
        self._segment_end.scatter_(0, slot, -1)
        ends = torch.where(done[kept].bool(), abs_step, -1)
        self._segment_end.scatter_reduce_(0, slot, ends, "amax")
        start = first % cap
        o, a = self.obs_dim, self.action_dim
        for dst, src in (  # each field into its columns of the rows: no concatenated copy
            (self._rows[..., :o], obs[kept]),
            (self._rows[..., o : o + a], act[kept]),
            (self._rows[..., o + a :], nag[kept]),
            (self._terminated, term[kept]),
            (self._truncated, trunc[kept]),
            (self._segment, segment[kept]),
        ):
            head = min(keep, cap - start)
            dst[start : start + head] = src[:head]
            dst[: keep - head] = src[head:]
        self._step_t.fill_(self._step + steps)

    def end_episodes(self) -> None:
        """End every env's running episode at its newest stored step (marked truncated), so the
        next ``extend`` starts new episodes: for envs that restart from a reset, as a resumed run
        does when the env could not save its state. Goals never cross the cut."""
        if self._step == 0:
            return
        last = (self._step - 1) % self._capacity
        running = ~(self._terminated[last] | self._truncated[last])
        self._truncated[last] |= running
        slot = self._open_segment % self._capacity
        envs = torch.arange(self.num_envs, device=self.device)
        end = torch.where(running, self._step - 1, self._segment_end[slot, envs])
        self._segment_end[slot, envs] = end
        self._open_segment += running.long()

    def sample(
        self,
        batch_size: int,
        *,
        goal_mode: str | None = None,
        random_goal_fraction: float | None = None,
        current_goal_fraction: float | None = None,
        generator: torch.Generator | None = None,
    ) -> GoalBatch:
        """Draw ``batch_size`` ``(observation, action, goal)`` triples; O(batch), no host sync.

        ``goal_mode`` and the mixing fractions default to the buffer's; a call may override them
        (to draw the actor's batch another way than the critic's, as ``--actor-goal-mode``
        does). ``generator`` defaults to ``self.generator``.
        """
        batch_size = positive_int("batch_size", batch_size)
        mode = self._check_mode(self.goal_mode if goal_mode is None else goal_mode)
        f_rand, f_cur = check_goal_mix(
            self.random_goal_fraction if random_goal_fraction is None else random_goal_fraction,
            self.current_goal_fraction if current_goal_fraction is None else current_goal_fraction,
        )
        if self._step == 0:
            raise ValueError("cannot sample from an empty buffer: call extend() first")
        gen = self.generator if generator is None else generator
        if not isinstance(gen, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {gen!r}")
        if gen.device.type != self.device.type:
            raise ValueError(f"generator is on {gen.device}, the buffer on {self.device}")
        bits = torch.randint(
            0, _BITS_HIGH, (batch_size, 3), device=self.device, dtype=torch.int64, generator=gen
        )
        args = (bits, self._step_t, self._segment, self._segment_end, self._rows)
        kw: dict[str, Any] = {
            "widths": (self.obs_dim, self.action_dim, self.goal_dim),
            "mode": GOAL_MODES.index(mode),
            "log_gamma": self._log_gamma,
            "th_rand": _f32(f_rand),
            "th_cur": _f32(f_rand + f_cur),
        }
        if self._use_triton:
            from crl_fast.kernels import goal_sampling

            return GoalBatch(*goal_sampling.sample(*args, **kw))
        return GoalBatch(*sample_reference(*args, **kw))

    def clear(self) -> None:
        """Forget all transitions and episodes (the generator keeps its state)."""
        self._rows.zero_()
        self._terminated.zero_()
        self._truncated.zero_()
        self._segment.zero_()
        self._segment_end.fill_(-1)
        self._open_segment.zero_()
        self._step_t.zero_()
        self._step = 0

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        return {
            "rows": self._rows,
            "terminated": self._terminated,
            "truncated": self._truncated,
            "segment": self._segment,
            "segment_end": self._segment_end,
            "open_segment": self._open_segment,
        }

    def _config(self) -> dict[str, Any]:
        """What a state must match to be loaded: shapes, dtype and the sampling law."""
        return {
            "capacity": self._capacity,
            "num_envs": self.num_envs,
            "obs_dim": self.obs_dim,
            "action_dim": self.action_dim,
            "goal_dim": self.goal_dim,
            "dtype": str(self.dtype),
            "gamma": self._gamma,
            "goal_mode": self.goal_mode,
            "random_goal_fraction": self.random_goal_fraction,
            "current_goal_fraction": self.current_goal_fraction,
        }

    def state_dict(self) -> dict[str, Any]:
        """A snapshot (cloned tensors) of contents, cursor, episode bookkeeping and RNG state."""
        sd: dict[str, Any] = {k: v.clone() for k, v in self._state_tensors().items()}
        sd.update(step=self._step, generator=self.generator.get_state(), config=self._config())
        return sd

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` in place (addresses kept, so CUDA graphs stay valid).

        Everything is checked before anything is written: a state that does not fit (another
        config or sampling law, wrong shapes, a generator state from another device type)
        raises ``ValueError`` and leaves the buffer as it was.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        config = state_dict.get("config")
        if not isinstance(config, Mapping):
            raise ValueError("state_dict has no 'config': not a TrajectoryBuffer state")
        mine = self._config()
        for key, value in mine.items():
            if key in _SAMPLING_LAW and key not in config:
                continue  # saved before the sampling law was recorded: nothing to compare
            if key not in config or config[key] != value:
                raise ValueError(
                    f"state_dict was saved from a buffer with config {key}="
                    f"{config.get(key, '<missing>')!r}, this one has {key}={value!r}"
                )
        extra = sorted(set(config) - set(mine))
        if extra:
            raise ValueError(f"state_dict config has unknown fields {extra}")
        tensors = self._state_tensors()
        for name, dst in tensors.items():
            src = state_dict.get(name)
            if not isinstance(src, torch.Tensor):
                raise ValueError(f"state_dict[{name!r}] must be a tensor, got {type(src).__name__}")
            if src.shape != dst.shape or src.dtype != dst.dtype:
                raise ValueError(
                    f"state_dict[{name!r}] is {src.dtype} {list(src.shape)}, "
                    f"the buffer's is {dst.dtype} {list(dst.shape)}"
                )
        saved = state_dict.get("step")
        try:
            step = -1 if saved is None or isinstance(saved, bool) else operator.index(saved)
        except TypeError:
            step = -1
        if not 0 <= step < 2**62:
            raise ValueError(
                f"state_dict['step'] must be an int in [0, 2**62), got {state_dict.get('step')!r}"
            )
        self._check_bookkeeping(state_dict, step)
        gen_state = generator_state(
            state_dict.get("generator"), self.device, "state_dict['generator']"
        )
        for name, dst in tensors.items():
            dst.copy_(state_dict[name])
        self._step = step
        self._step_t.fill_(step)
        self.generator.set_state(gen_state)

    def _check_bookkeeping(self, state_dict: Mapping[str, Any], step: int) -> None:
        """The episode bookkeeping must fit ``step`` and the done flags (a host sync; loading is
        rare), so that an edited end (say, one inside the next episode) cannot send goals across
        episodes. Two checks, each freeing its temporaries before the next. The running episode
        lies in [0, step] (at most one ends per step) even with nothing stored: the kernels index
        ``segment_end`` with it, and a negative one would write before the tensor."""
        segment = state_dict["segment"]
        dev = segment.device
        open_segment = state_dict["open_segment"].to(dev)
        if not bool(((open_segment >= 0) & (open_segment <= step)).all()):
            raise ValueError(
                f"state_dict['open_segment'] must lie in [0, state_dict['step'] = {step}] (at "
                f"most one episode ends per step), got values from {int(open_segment.min())} to "
                f"{int(open_segment.max())}"
            )
        ends = state_dict["segment_end"].to(dev)
        done = state_dict["terminated"].to(dev) | state_dict["truncated"].to(dev)
        stored = min(step, self._capacity)
        if not (
            self._ends_fit(segment, ends, done, open_segment, step, stored)
            and self._episodes_follow_flags(segment, done, open_segment, step, stored)
        ):
            raise ValueError(
                f"state_dict['segment'] / ['segment_end'] do not fit state_dict['step'] = "
                f"{step} and the done flags: the episode bookkeeping belongs to another step "
                "count or was edited"
            )

    def _ends_fit(
        self,
        segment: torch.Tensor,
        ends: torch.Tensor,
        done: torch.Tensor,
        open_segment: torch.Tensor,
        step: int,
        stored: int,
    ) -> bool:
        """Each stored row's episode is the running one exactly when it has no end, and an
        ended one ends at or after that row's step and before ``step``, at a row of that
        episode whose done flag is set."""
        cap = self._capacity
        rows = torch.arange(stored, device=segment.device)
        row_step = rows + cap * torch.div(step - 1 - rows, cap, rounding_mode="floor")
        episode = segment[:stored]
        end = ends.gather(0, episode % cap)
        end_row = end % cap  # stored where the end is valid: row_step <= end < step
        ends_here = (segment.gather(0, end_row) == episode) & done.gather(0, end_row)
        consistent = (episode >= 0) & torch.where(
            episode == open_segment,
            end == -1,
            (end >= row_step[:, None]) & (end < step) & ends_here,
        )
        return bool(consistent.all())

    def _episodes_follow_flags(
        self,
        segment: torch.Tensor,
        done: torch.Tensor,
        open_segment: torch.Tensor,
        step: int,
        stored: int,
    ) -> bool:
        """In step order, each row's episode is the previous row's plus its done flag, and the
        running episode the newest row's plus its own."""
        if not stored:
            return True
        in_order = torch.arange(step - stored, step, device=segment.device) % self._capacity
        seg, flag = segment[in_order], done[in_order].long()  # oldest row first
        return bool((seg[1:] == seg[:-1] + flag[:-1]).all()) and bool(
            (open_segment == seg[-1] + flag[-1]).all()
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(len={len(self)}, capacity={self._capacity}, "
            f"num_envs={self.num_envs}, goal_mode={self.goal_mode!r}, device={self.device})"
        )
