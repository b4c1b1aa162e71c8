"""The contrastive RL agent: two encoders, a tanh-Gaussian actor, an entropy weight, one update.

The critic is f(phi(s, a), psi(g)), trained with :func:`crl_fast.contrastive_loss` to tell the
future goal of each (s, a) from the goals of the other rows of the batch. The actor maximises
f(phi(s, pi(s, g)), psi(g)) plus an entropy bonus whose weight alpha is tuned automatically.

:meth:`CRL.update` performs the critic, actor and alpha steps without reading any tensor on the
host, so it can run under ``torch.compile`` or inside a CUDA graph; its metrics stay tensors.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from crl_fast.buffer import GoalBatch
from crl_fast.checks import check_bool, is_real, on_device, positive_int, resolve_device
from crl_fast.compiling import compile_isolated
from crl_fast.config import ACTOR_RANDOM_GOALS, AMP_DTYPES, AgentConfig
from crl_fast.energy import pairwise_energy
from crl_fast.loss import contrastive_loss
from crl_fast.networks import Encoder, TanhGaussianActor


def make_adam(params: Iterable[torch.Tensor], lr: float, device: torch.device) -> torch.optim.Adam:
    """Fused Adam; on CUDA also capturable (state on the device, CUDA-graph safe). On CPU, fused
    took 6.1-6.4 ms per default update against 6.6 ms with ``foreach`` (2 threads, this CPU)."""
    return torch.optim.Adam(params, lr=lr, fused=True, capturable=device.type == "cuda")


def _step(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.step()``, as a function that :meth:`CRL.compile` keeps out of the compiler."""
    optimizer.step()


_IMPLEMENTATION_FLAGS = ("fused", "foreach", "capturable")
"""Adam options that choose an implementation, not the maths: a checkpoint's (saved on another
device or by an older version) would override the ones :func:`make_adam` picked."""


def actor_goals(
    obs: torch.Tensor, goal: torch.Tensor, psi: torch.Tensor, random_goals: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The actor's (observation, goal, psi(goal)) rows, as the original contrastive_rl's
    ``random_goals`` picks them: each row's own future goal (0), another row's goal (1; the rows
    are independent draws, so it is a random goal from rho(g)), or each observation twice, with
    both (0.5: twice the rows). The other row's psi is reused: no extra encoder pass."""
    if random_goals not in ACTOR_RANDOM_GOALS:
        raise ValueError(f"random_goals must be one of {ACTOR_RANDOM_GOALS}, got {random_goals!r}")
    if random_goals == 0:
        return obs, goal, psi
    other_goal, other_psi = goal.roll(1, 0), psi.roll(1, 0)
    if random_goals == 1:
        return obs, other_goal, other_psi
    return (
        torch.cat([obs, obs]),
        torch.cat([goal, other_goal]),
        torch.cat([psi, other_psi]),
    )


Batch = GoalBatch | tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""What :meth:`CRL.update` takes: a :class:`GoalBatch` or any (observation, action, goal)."""


def _unpack(batch: Batch, name: str) -> GoalBatch:
    """``batch`` as a GoalBatch if it is a sequence of 3 (observation, action, goal); else a
    TypeError naming ``name`` (a dict would unpack into its keys)."""
    if isinstance(batch, dict) or not isinstance(batch, Sequence) or len(batch) != 3:
        raise TypeError(
            f"{name} must be a GoalBatch or a sequence (observation, action, goal), got "
            f"{type(batch).__name__}"
        )
    return GoalBatch(*batch)


class CRL:
    """Networks, optimisers and the update of contrastive RL (Eysenbach et al., 2022).

    Its parts, for a loop's own losses: ``sa_encoder(obs, action)`` (phi) and
    ``goal_encoder(goal)`` (psi), ``actor`` (``actor.sample(obs, goal)``: a reparameterised
    action and its log-probability, drawn from torch's global generator), ``log_alpha`` and
    ``target_entropy``, and ``critic_optimizer``, ``actor_optimizer``, ``alpha_optimizer``.

    ``actor_stream`` (CUDA only) runs the actor and alpha steps on a second stream, beside the
    critic's forward and backward: a CUDA graph of the update then holds two parallel branches.
    The numbers are the same either way.
    """

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        goal_dim: int,
        config: AgentConfig | None = None,
        device: torch.device | str = "cpu",
        actor_stream: bool = False,
    ) -> None:
        dims = {"obs_dim": obs_dim, "action_dim": action_dim, "goal_dim": goal_dim}
        obs_dim, action_dim, goal_dim = (positive_int(k, v) for k, v in dims.items())
        if config is not None and not isinstance(config, AgentConfig):
            raise TypeError(
                f"config must be an AgentConfig (AgentConfig(**d) for a dict), got "
                f"{type(config).__name__}"
            )
        self._config = config = config or AgentConfig()
        self.device = device = resolve_device(device)
        self._widths = {"observation": obs_dim, "action": action_dim, "goal": goal_dim}  # checks
        self._min_rows = max(config.loss_config().minimum_batch())  # the critic's batch (B = M)
        check_bool("actor_stream", actor_stream)  # "no" would start the second stream
        if actor_stream and device.type != "cuda":
            raise ValueError(f"actor_stream needs a CUDA device, got {device}")
        net: dict[str, Any] = dict(
            width=config.width,
            depth=config.depth,
            activation=config.activation,
            layer_norm=config.layer_norm,
            residual=config.residual,
            fused=config.fused_mlp,
            init=config.init,
        )
        self.sa_encoder = Encoder(obs_dim + action_dim, config.repr_dim, **net).to(device)
        self.goal_encoder = Encoder(goal_dim, config.repr_dim, **net).to(device)
        self.actor = TanhGaussianActor(
            obs_dim, goal_dim, action_dim, **(net | config.actor_size())
        ).to(device)
        log_alpha = math.log(config.alpha) if config.alpha > 0 else -math.inf  # 0: no entropy
        self.log_alpha = torch.tensor(log_alpha, device=device, requires_grad=True)
        self.target_entropy = -config.target_entropy_scale * action_dim

        critic_params = [*self.sa_encoder.parameters(), *self.goal_encoder.parameters()]
        self.critic_optimizer = make_adam(critic_params, config.critic_lr, device)
        self.actor_optimizer = make_adam(self.actor.parameters(), config.actor_lr, device)
        self.alpha_optimizer = make_adam([self.log_alpha], config.alpha_lr, device)
        self._actor_params = list(self.actor.parameters())
        self._side = torch.cuda.Stream(device) if actor_stream else None
        self._encode_goals = self._encode_goals_eager
        self._actor_step = self._actor_step_eager
        self._critic_backward = self._critic_backward_eager
        self._critic_step = self._critic_step_eager
        self._act = self._act_eager
        self._step = _step

    @property
    def config(self) -> AgentConfig:
        """The (frozen) config the agent was built with; read-only, as a new one would apply
        only in part (the networks and optimisers are built)."""
        return self._config

    def parameter_counts(self) -> dict[str, int]:
        """Parameters of each network by name: the axis depth and width scaling are read on."""
        nets = {
            "sa_encoder": self.sa_encoder,
            "goal_encoder": self.goal_encoder,
            "actor": self.actor,
        }
        return {name: sum(p.numel() for p in net.parameters()) for name, net in nets.items()}

    def compile(self, **kwargs: Any) -> None:
        """Run :meth:`act` and the four parts of :meth:`update` through
        ``torch.compile(**kwargs)`` from now on.

        The parts are compiled one by one, so the streams that :meth:`update` puts them on are
        chosen in plain Python, outside the compiled code. Each agent compiles into caches of its
        own (:func:`crl_fast.compiling.compile_isolated`), with static shapes unless ``kwargs``
        say otherwise: each batch size a part is called with compiles an entry. The optimisers
        step uncompiled (their fused Adam kernel is never compiled anyway): compiled, each new
        float learning rate (a schedule's) would be an entry of its own, and on torch without
        ``isolate_recompiles`` (2.11) ``Optimizer.step``, reached through a graph break, would
        keep one cache shared by every agent.
        """
        self._encode_goals = compile_isolated(self._encode_goals_eager, **kwargs)
        self._actor_step = compile_isolated(self._actor_step_eager, **kwargs)
        self._critic_backward = compile_isolated(self._critic_backward_eager, **kwargs)
        self._critic_step = compile_isolated(self._critic_step_eager, **kwargs)
        self._act = compile_isolated(self._act_eager, **kwargs)
        self._step = torch.compiler.disable(_step)

    def _autocast(self) -> contextlib.AbstractContextManager:
        """``torch.autocast`` in the ``config.amp`` dtype, for forward passes (backward runs
        outside it, as torch recommends); a no-op without ``amp``. Its cache of cast weights is
        off: each region uses a weight once, and a cache kept across CUDA graph capture
        boundaries would hold freed memory (torch's advice for autocast in graphs)."""
        dtype = AMP_DTYPES[self.config.amp]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype, cache_enabled=False)

    @torch.no_grad()
    def act(
        self, obs: torch.Tensor, goal: torch.Tensor, deterministic: bool = False
    ) -> torch.Tensor:
        """Actions in [-1, 1]: samples for collection, tanh(mean) for evaluation."""
        self._check_rows(observation=obs, goal=goal)
        check_bool("deterministic", deterministic)  # "yes" would be truthy, "no" too
        return self._act(obs, goal, deterministic=deterministic)

    def _check_rows(self, **tensors: torch.Tensor) -> None:
        """A TypeError or ValueError naming the problem unless each tensor is a float32 (B, width)
        batch of this agent's width, all with the same B >= 1, on its device. Checked before any
        step: a shape error halfway through :meth:`update` would leave the actor stepped and the
        critic not. Metadata only: nothing is read from the device."""
        first: tuple[str, int] | None = None  # the first tensor's name and rows
        for name, t in tensors.items():
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
            if t.ndim != 2 or t.shape[1] != self._widths[name]:
                raise ValueError(f"{name} must be (B, {self._widths[name]}), got {tuple(t.shape)}")
            if t.dtype != torch.float32:
                raise TypeError(f"{name} must be float32 (the networks' dtype), got {t.dtype}")
            if t.device != self.device:
                raise ValueError(f"{name} is on {t.device}, the agent on {self.device}")
            first = first or (name, t.shape[0])
            if t.shape[0] != first[1]:
                raise ValueError(f"{name} has {t.shape[0]} rows, {first[0]} {first[1]}")
        if first is not None and first[1] == 0:
            raise ValueError("empty batch: 0 rows")

    def _act_eager(
        self, obs: torch.Tensor, goal: torch.Tensor, deterministic: bool
    ) -> torch.Tensor:
        with self._autocast():
            return self.actor(obs, goal, deterministic=deterministic)

    def _encode_goals_eager(self, goal: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self.goal_encoder(goal)

    def update(
        self,
        batch: Batch,
        critic_metrics: bool = True,
        actor_batch: Batch | None = None,
    ) -> dict[str, torch.Tensor]:
        """One actor, alpha and critic step on ``batch`` (observation, action, goal tensors).

        Returns detached 0-d metric tensors; nothing is synchronised with the host. Without
        ``critic_metrics`` the critic's accuracies and mean logits are left out (the losses
        stay): they cost the loss kernels extra work, and the sigmoid loss a pass of its own.
        The step is the same either way. ``actor_batch`` (a batch like ``batch``, of any number
        of rows; its actions are not read) trains the actor instead of ``batch``: goals drawn
        another way than the critic's, as OGBench's CRL draws them (it draws them for the
        critic's anchors; here the actor's batch has anchors of its own). It costs a second
        ``psi`` forward pass, without gradients.
        """
        if not torch.is_grad_enabled():  # else "element 0 of tensors does not require grad"
            raise RuntimeError(
                "CRL.update takes gradient steps: it cannot run under torch.no_grad() or "
                "torch.inference_mode() (act() can)"
            )
        obs, action, goal = _unpack(batch, "batch")
        self._check_rows(observation=obs, action=action, goal=goal)
        # Checked here, not left to the critic's loss: the actor and alpha step first.
        check_bool("critic_metrics", critic_metrics)
        if obs.shape[0] < self._min_rows:
            c = self.config
            raise ValueError(
                f"loss {c.loss!r} (exclude_positive_from_lse={c.exclude_positive_from_lse}, "
                f"logsumexp_penalty={c.logsumexp_penalty}) compares off-diagonal pairs: batches "
                f"need >= {self._min_rows} rows, got {obs.shape[0]}"
            )
        if actor_batch is None:
            actor_obs, actor_goal = obs, goal
        else:
            actor_obs, _, actor_goal = _unpack(actor_batch, "actor_batch")
            self._check_rows(observation=actor_obs, goal=actor_goal)
        if self.config.actor_random_goals and actor_obs.shape[0] < 2:
            raise ValueError("actor_random_goals takes other rows' goals: batches need >= 2 rows")
        # psi(g) once: the critic trains through it, the actor reads it (an actor batch needs
        # psi of its own goals). The actor and alpha steps read the critic as it stands before
        # this update (as JaxGCRL does) and write nothing the critic reads, so with
        # ``actor_stream`` they run beside the critic's forward and backward; only the critic's
        # optimiser step waits for them.
        psi = self._encode_goals(goal)
        with self._on_side_stream():
            if actor_batch is None:
                actor_psi = psi.detach()
            else:
                with torch.no_grad():
                    actor_psi = self._encode_goals(actor_goal)
            actor = self._actor_step(actor_obs, actor_goal, actor_psi)
        critic = self._critic_backward(obs, action, psi, critic_metrics)
        if self._side is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._side)
        self._critic_step()
        return critic | actor

    @contextlib.contextmanager
    def _on_side_stream(self) -> Iterator[None]:
        """Run the block on the side stream, after the work queued so far on the current stream
        (no-op without ``actor_stream``)."""
        if self._side is None:
            yield
            return
        self._side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._side):
            yield

    def _actor_step_eager(
        self, obs: torch.Tensor, goal: torch.Tensor, psi: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The actor and alpha steps; the encoders are read, not trained (``psi``: detached)."""
        cfg = self.config
        obs, goal, psi = actor_goals(obs, goal, psi, cfg.actor_random_goals)
        # Each loss has its own autograd graph (no tensor with a graph is shared between two
        # backward calls), as torch.compile needs: it fuses each region into one node.
        alpha = self.log_alpha.detach().exp()
        with self._autocast():
            new_action, log_prob = self.actor.sample(obs, goal)
            # Read, not trained: backward(inputs=...) below prunes the layers' weight gradients,
            # but the fused kernels cannot see it; frozen=True tells them (it would cost the
            # layers ~0.3 ms an update on a 2-core CPU: torch.func.functional_call).
            phi = self.sa_encoder(obs, new_action, frozen=cfg.fused_mlp)
            q = pairwise_energy(phi, psi, energy=cfg.energy)
            actor_loss = (alpha * log_prob - q).mean()
        self.actor_optimizer.zero_grad()
        actor_loss.backward(inputs=self._actor_params)  # no gradients into the encoders
        self._step(self.actor_optimizer)
        log_prob = log_prob.detach()

        # Alpha: move the policy entropy towards the target.
        alpha_loss = (self.log_alpha.exp() * (-log_prob - self.target_entropy)).mean()
        if cfg.autotune_alpha:
            self.alpha_optimizer.zero_grad()
            alpha_loss.backward()
            self._step(self.alpha_optimizer)
        return {
            "actor/loss": actor_loss.detach(),
            "actor/entropy": -log_prob.mean(),
            "alpha": alpha,
            "alpha/loss": alpha_loss.detach(),
        }

    def _critic_backward_eager(
        self, obs: torch.Tensor, action: torch.Tensor, psi: torch.Tensor, critic_metrics: bool
    ) -> dict[str, torch.Tensor]:
        """The critic's loss and gradients (through ``psi = psi(g)`` too): classify which goal
        in the batch is the future of each (s, a). Its optimiser step is left to :meth:`update`."""
        cfg = self.config
        with self._autocast():  # under amp: the loss kernels take bfloat16 phi and psi
            critic_out = contrastive_loss(
                self.sa_encoder(obs, action),
                psi,
                loss=cfg.loss,
                energy=cfg.energy,
                logsumexp_penalty=cfg.logsumexp_penalty,
                exclude_positive_from_lse=cfg.exclude_positive_from_lse,
                return_metrics=critic_metrics,
            )
        critic_loss, loss_metrics = (
            critic_out if isinstance(critic_out, tuple) else (critic_out, {})
        )
        self.critic_optimizer.zero_grad()
        critic_loss.backward()
        metrics = {f"critic/{k}": v.detach() for k, v in loss_metrics.items()}
        return metrics | {"critic/loss": critic_loss.detach()}

    def _critic_step_eager(self) -> None:
        self._step(self.critic_optimizer)

    def state_dict(self) -> dict[str, Any]:
        """A snapshot (copied tensors, as the buffer's and the envs' ``state_dict`` are) of the
        networks, entropy weight and optimiser states: later updates do not change it.
        (``nn.Module.state_dict`` and ``Optimizer.state_dict`` return the live tensors, so a
        snapshot kept in memory would have moved on with the weights, and the entropy weight not.)
        """
        return copy.deepcopy(
            {
                "sa_encoder": self.sa_encoder.state_dict(),
                "goal_encoder": self.goal_encoder.state_dict(),
                "actor": self.actor.state_dict(),
                "log_alpha": self.log_alpha.detach(),
                "critic_optimizer": self.critic_optimizer.state_dict(),
                "actor_optimizer": self.actor_optimizer.state_dict(),
                "alpha_optimizer": self.alpha_optimizer.state_dict(),
            }
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned, into the existing parameters; a ValueError,
        with the agent unchanged, if ``state`` does not fit it (another agent's sizes, say).

        Optimiser states are copied first: ``Optimizer.load_state_dict`` would otherwise share
        their tensors with ``state`` (and with the agent that produced it). Like the parameters,
        the Adam moments already there are written in place, so a :class:`GraphedUpdates`
        captured before (a rollback to a snapshot) keeps updating the agent's own tensors.
        As with torch's optimisers, the state's learning rates and entropy weight come with it
        (a learning-rate scheduler resumes from them); ``config`` is not consulted.
        """
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict (CRL.state_dict()), got {type(state).__name__}")
        backup = self.state_dict()  # a copy
        missing = sorted(set(backup) - set(state))
        if missing:
            raise ValueError(f"not a CRL agent state: it lacks {missing} (it has {sorted(state)})")
        try:
            self._load(state)
        except Exception as error:  # a malformed state fails anywhere
            self._load(backup)  # nothing half-loaded
            raise ValueError(f"this state does not fit the agent: {error}") from error

    def _load(self, state: dict[str, Any]) -> None:
        state = copy.deepcopy(state)
        self.sa_encoder.load_state_dict(state["sa_encoder"])
        self.goal_encoder.load_state_dict(state["goal_encoder"])
        self.actor.load_state_dict(state["actor"])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        for name in ("critic_optimizer", "actor_optimizer", "alpha_optimizer"):
            optimizer = getattr(self, name)
            flags = {k: optimizer.defaults[k] for k in _IMPLEMENTATION_FLAGS}
            for group in state[name]["param_groups"]:  # before loading: they place its steps
                group.update(flags)
            # Optimizer.load_state_dict puts new tensors in the state: a CUDA graph captured
            # before holds the old ones' addresses, and would go on writing to freed memory.
            kept = {param: dict(values) for param, values in optimizer.state.items()}
            optimizer.load_state_dict(state[name])
            try:
                _check_adam_state(optimizer, name)
            except ValueError:  # put the agent's own tensors back for the rollback to write
                optimizer.state = defaultdict(dict, kept)
                raise
            for param, old_values in kept.items():
                values = optimizer.state[param]  # {} for a state from before the first step
                for key, old in old_values.items():
                    new = values.get(key)
                    if new is None:  # Adam starts from zeros (moments and step count)
                        values[key] = old.zero_()
                    elif _fits(old, new):
                        values[key] = old.copy_(new)


def _check_adam_state(optimizer: torch.optim.Adam, name: str) -> None:
    """A ValueError unless each parameter's loaded Adam state is one Adam wrote for it: its
    moments shaped like the parameter, one step count, real hyperparameters.
    ``Optimizer.load_state_dict`` checks only the groups' sizes, and the fused step reads the
    moments without checking them (a wrong shape overruns memory)."""
    for i, group in enumerate(optimizer.param_groups):
        for key in ("lr", "eps", "weight_decay"):
            if not is_real(group.get(key)):
                raise ValueError(
                    f"{name} group {i}: {key} must be a number, got {group.get(key)!r}"
                )
        betas = group.get("betas")
        if not (isinstance(betas, tuple | list) and len(betas) == 2 and all(map(is_real, betas))):
            raise ValueError(f"{name} group {i}: betas must be two numbers, got {betas!r}")
        moments = {"exp_avg", "exp_avg_sq"} | (
            {"max_exp_avg_sq"} if group.get("amsgrad") else set()
        )
        for j, param in enumerate(group["params"]):
            values = optimizer.state.get(param)
            if not values:  # no step taken yet
                continue
            where = f"{name} state of parameter {j} of group {i} ({tuple(param.shape)})"
            if set(values) != moments | {"step"}:
                raise ValueError(
                    f"{where} has {sorted(values)}, Adam's {sorted(moments | {'step'})}"
                )
            step = values["step"]
            if not (isinstance(step, torch.Tensor) and step.numel() == 1):
                raise ValueError(f"{where}: step must be a one-element tensor, got {step!r}")
            for key in sorted(moments):
                t = values[key]
                if not isinstance(t, torch.Tensor) or t.shape != param.shape:
                    got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                    raise ValueError(f"{where}: {key} is {got}, not the parameter's shape")


def _fits(old: torch.Tensor, new: Any) -> bool:
    """Whether ``new`` can be copied into ``old`` in place."""
    same = isinstance(new, torch.Tensor) and new.shape == old.shape
    return same and (new.dtype, new.device) == (old.dtype, old.device)


class GraphedUpdates:
    """``steps`` x (sample a batch, :meth:`CRL.update`) captured in one CUDA graph, then replayed.

    ``sample`` must be capturable: e.g. ``lambda: buffer.sample(B, generator=cuda_default)`` (the
    buffer reads its size from the device, so the graph keeps up as the buffer grows), and so
    must ``sample_actor``, which draws the actor's batch (default: the actor trains on
    ``sample``'s batch). Capture needs ``warmup`` ordinary updates first (they initialise the
    optimiser state and cuBLAS, and compile both kinds of update of a compiled agent); they are
    real updates, counted in ``warmup_updates``. Only the last update of each replay computes
    the critic's metrics, the ones it returns. Build this after loading a checkpoint: the graph
    holds the addresses of the parameters and optimiser state.
    """

    def __init__(
        self,
        agent: CRL,
        sample: Callable[[], Batch],
        steps: int = 1,
        warmup: int = 3,
        sample_actor: Callable[[], Batch] | None = None,
    ) -> None:
        if steps < 1 or warmup < (2 if steps > 1 else 1):
            raise ValueError(
                f"steps must be >= 1 and warmup >= 1 (>= 2 with steps > 1: both kinds of "
                f"update run before capture), got {steps} and {warmup}"
            )
        if agent.device.type != "cuda":
            raise ValueError(f"GraphedUpdates captures CUDA graphs: the agent is on {agent.device}")
        self.device = agent.device

        def update(critic_metrics: bool) -> dict[str, torch.Tensor]:
            batch = sample()
            actor_batch = None if sample_actor is None else sample_actor()
            return agent.update(batch, critic_metrics, actor_batch)

        with on_device(self.device):  # capture and replay on the agent's device
            side = torch.cuda.Stream(agent.device)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for i in range(warmup):
                    update(critic_metrics=steps == 1 or i == warmup - 1)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                for i in range(steps):
                    self.metrics = update(critic_metrics=i == steps - 1)
        self.steps, self.warmup_updates = steps, warmup

    def __call__(self) -> dict[str, torch.Tensor]:
        """Run the ``steps`` updates; the metrics of the last one (overwritten by the next call)."""
        with on_device(self.device):
            self.graph.replay()
        return self.metrics
