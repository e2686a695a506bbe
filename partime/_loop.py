"""The one driver loop of the fixed-point solve.

Solves `r_t = s_t - f(s_{t-1}, x_t) = 0`, `t = 1..T`, for `s_1..s_T` given `s_0`:
evaluate → the method's update → its trust region or damping → converged? → hopeless?
→ the schedule moves → the prefix exact to rounding → the exact sequential fallback →
statistics. The method owns its policy (`propose`, `cut`, `judge`); the layout owns
where time lives (the reductions over the steps in flight, the fallback); the schedule
owns which steps are in flight (all of them, or a window that moves on past its
settled steps) and may answer a hopeless verdict by narrowing the window it trusts
updates over instead of stopping. None of them edits this loop.
"""

import abc
import math
from collections.abc import Callable
from typing import ClassVar, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from equinox.internal import unvmap_any
from jaxtyping import Array, Bool, Float, Int, PyTree

from ._lds import AbstractTransition
from ._method.base import AbstractMethod
from ._misc import batch_where
from ._stats import count, RESULTS, Stats


class _HopelessRule(NamedTuple):
    """The hopeless-case test's design (static). The default is the rule below;
    `benchmarks/hopeless.py` measures it against the alternatives these fields
    describe (the rule before: `max_rejections=2, rejections_wait=True,
    frontier=False, restart_trusted_only=False`)."""

    # Progress is measured over this fraction of the cap (at least 2 iterations).
    patience: float = 0.1
    # Undamped updates rejected this many times in a row are hopeless; `None`: only
    # a rejection over a horizon of one step (no shorter horizon is left to try).
    max_rejections: int | None = None
    # Whether rejected iterations count towards the patience (they make no progress
    # but measure the horizon over which the linearisation can be trusted).
    rejections_wait: bool = False
    # Whether the advance of the trusted frontier (the converged prefix plus the
    # trust horizon) counts as progress, besides the prefix and the merit.
    frontier: bool = True
    # Whether the fallback restarts after the prefix exact to rounding only where
    # the last trust horizon covered every step, and otherwise after the prefix whose
    # residuals are exactly zero.
    restart_trusted_only: bool = True
    # Whether an iteration whose Lyapunov estimate along the converged prefix (the
    # exact trajectory, at least `_LYAPUNOV_STEPS` steps) is negative goes on.
    contracting: bool = True
    # Whether the trust horizon's growth factor over the last window counts: the
    # frontier reaching the end at it, unless the Lyapunov estimate is positive
    # (`"gated"`), or regardless of it (`"always"`); `None`: not counted.
    horizon_growth: str | None = "gated"


_HOPELESS = _HopelessRule()

# `Stats.lyapunov` of an iteration that did not converge needs at least this many
# converged steps: over fewer, their growth is a transient (on an RNN of gain 1.5
# that contracts at -0.35 per step, +0.27 over its first step from rest).
_LYAPUNOV_STEPS = 8


def within(x: Array, tol: Array) -> Bool[Array, " T"]:
    """Per step: every component of `|x_t| <= tol_t`. NaN compares False: not within."""
    return jnp.all(jnp.abs(x) <= tol, axis=-1)


class AbstractSchedule(eqx.Module):
    """Which of the `length` steps are in flight, and how that changes after an
    iteration. The loop iterates on the steps in flight, with the layout's reductions
    over them; its tests of convergence and hopelessness count settled and converged
    steps over the whole sequence."""

    length: eqx.AbstractVar[int]
    # Whether `advance` can move the steps in flight (static).
    moves: eqx.AbstractClassVar[bool]

    @abc.abstractmethod
    def iteration_cap(self, method: AbstractMethod) -> int:
        """The number of iterations after which the loop stops."""

    @abc.abstractmethod
    def start(self, init: Array, guess: Array | None) -> tuple[PyTree, Array]:
        """`(state, iterate)`: the schedule's state and the first iterate in flight."""

    @abc.abstractmethod
    def in_flight(
        self, state: PyTree, init: Array, xs: PyTree, scale: Array | None
    ) -> tuple[Array, PyTree, Array | None]:
        """`(head, xs, scale)` of the steps in flight: the state before the first
        of them, their inputs, their tolerance factors."""

    @abc.abstractmethod
    def offset(self, state: PyTree) -> Int[Array, ""]:
        """The index of the first step in flight."""

    @abc.abstractmethod
    def advance(
        self, state: PyTree, states: Array, settled: Int[Array, ""]
    ) -> tuple[PyTree, Array, Int[Array, ""]]:
        """`(state, iterate, shift)` after an iteration whose first `settled` steps in
        flight are final: the steps in flight move `shift <= settled` steps on."""

    @abc.abstractmethod
    def finish(self, state: PyTree, states: Array) -> Array:
        """Every step's state, given the last iterate in flight."""

    @abc.abstractmethod
    def width(self, state: PyTree) -> Int[Array, ""]:
        """How many steps are solved together (`Stats.window`)."""

    # Whether the schedule answers a hopeless iteration by narrowing the steps it
    # iterates on (static): then `limit` and `narrow` below are used.
    narrows: ClassVar[bool] = False

    def limit(self, state: PyTree, prefix: Int[Array, ""]) -> Int[Array, ""]:
        """The index from which the steps in flight are held (not updated), given
        the converged `prefix`: the end of the window."""
        raise NotImplementedError

    def held(self, state: PyTree, states: Array) -> Array:
        """The values at which the steps past `limit` are held, given the iterate."""
        raise NotImplementedError

    def narrow(
        self,
        state: PyTree,
        iteration: Int[Array, ""],
        reached: Int[Array, ""],
        hopeless: Bool[Array, ""],
    ) -> tuple[Bool[Array, ""], PyTree, Int[Array, ""]]:
        """`(narrowed, state, cap)` after `iteration` iterations with `reached` steps
        converged, given the loop's `hopeless` verdict: whether the schedule narrows
        its window — on the verdict (if not, the loop stops), or where it judges the
        progress too slow for its width — and then its state and the new cap."""
        raise NotImplementedError


class WholeSchedule(AbstractSchedule):
    """Every step is in flight, all the time."""

    length: int = eqx.field(static=True)
    moves: ClassVar[bool] = False

    def iteration_cap(self, method):
        return method.iteration_cap(self.length)

    def start(self, init, guess):
        return None, guess

    def in_flight(self, state, init, xs, scale):
        return init, xs, scale

    def offset(self, state):
        return jnp.asarray(0, jnp.int32)

    def advance(self, state, states, settled):
        return state, states, jnp.asarray(0, jnp.int32)

    def finish(self, state, states):
        return states

    def width(self, state):
        return jnp.asarray(self.length, jnp.int32)


class _Carry(eqx.Module):
    iteration: Int[Array, ""]
    states: Float[Array, "T d"]
    transition: AbstractTransition
    residual: Float[Array, "T d"]
    merit: Float[Array, ""]
    prefix: Int[Array, ""]
    # The converged prefix of the iterate at which `transition` was linearised: the
    # transitions over it are the exact trajectory's (`Stats.lyapunov`).
    linearised_prefix: Int[Array, ""]
    # The leading steps in flight whose residual and last update are within
    # tolerance: final.
    settled: Int[Array, ""]
    # The schedule's state, and how often it moved.
    schedule: PyTree
    advances: Int[Array, ""]
    # The method's policy: Newton's trust horizon, ELK's λ.
    policy: PyTree
    # (prefix, merit, trusted frontier) after each of the last few iterations that
    # count towards the patience, oldest first, for the hopeless-case test.
    past_prefix: Int[Array, " w"]
    past_merit: Float[Array, " w"]
    past_frontier: Int[Array, " w"]
    # Updates rejected in a row.
    rejections: Int[Array, ""]
    hopeless: Bool[Array, ""]
    # The iteration cap (static, unless the schedule narrows), and the iterations
    # that counted towards the patience since the start or the last narrowing.
    cap: Int[Array, ""]
    waited: Int[Array, ""]
    # The last Lyapunov estimate the hopeless-case test computed (NaN: none).
    lyapunov: Float[Array, ""]
    # Before the first iteration: the loop's first pass only evaluates and
    # linearises the guess (in the code that linearises every accepted iterate, so
    # that it is traced and compiled once).
    first: Bool[Array, ""]


def iterate(
    step: Callable,
    init: Float[Array, " d"],
    xs: PyTree,
    guess: Float[Array, "T d"] | None,
    method: AbstractMethod,
    layout,
    schedule: AbstractSchedule | None = None,
    scale: Float[Array, " T"] | None = None,
    give_up: Bool[Array, ""] | None = None,
) -> tuple[Float[Array, "T d"], Stats]:
    """The solve on a layout whose reductions the loop can use (the whole sequence,
    or one device's chunk inside `shard_map`), over the steps in flight that the
    `schedule` picks (default: all of them). `scale`: per-step tolerance factors.
    `give_up`: a caller's prediction that the iteration is hopeless; if true (and
    the method has a fallback), no Jacobian is evaluated and no iteration runs.
    Returns the states of every step and the statistics (their arrays only)."""
    length = layout.length
    if schedule is None:
        schedule = WholeSchedule(length)
    total = schedule.length
    rtol, atol = method.tolerances(init.dtype)
    dtype = init.dtype
    cap = schedule.iteration_cap(method)
    init_finite = jnp.all(jnp.isfinite(init))
    index = layout.index
    eps = float(jnp.finfo(dtype).eps)
    rule = _HOPELESS
    window_size = max(2, math.ceil(rule.patience * cap))
    # (A damped method's updates are trusted over every step: no horizon. Gated
    # by the Lyapunov estimate: only where the transitions are Jacobians.)
    horizon_growth = rule.horizon_growth
    if not (rule.frontier and method.rejections_are_hopeless and window_size > 2):
        horizon_growth = None
    if horizon_growth == "gated" and not method.transitions_are_jacobians:
        horizon_growth = None
    if give_up is None or not method.fallback:
        give_up = jnp.array(False)

    def tolerance(states, scale):
        tol = atol + rtol * jnp.abs(states)
        return tol if scale is None else scale[:, None] * tol

    def measure(states, f, scale):
        residual = states - f
        ok = within(residual, tolerance(states, scale))
        return residual, layout.merit(residual), layout.first_false(ok)

    def lyapunov_estimate(transition, used, known):
        # The growth of the products of the step Jacobians over the first `used`
        # steps, per step: an estimate of the largest Lyapunov exponent, along the
        # exact trajectory where they were linearised at the converged prefix. NaN
        # where not `known`, and for transitions that are not Jacobians.
        if not method.transitions_are_jacobians:
            return jnp.asarray(jnp.nan, dtype)
        growth = layout.total(transition.log_growth(index < used))
        per_step = growth / jnp.maximum(used, 1).astype(growth.dtype)
        return jnp.where(known, per_step, jnp.nan).astype(dtype)

    def converged(carry):
        return schedule.offset(carry.schedule) + carry.settled == total

    def cond_fun(carry):
        return (
            (carry.iteration < carry.cap)
            & ~converged(carry)
            & ~carry.hopeless
            & init_finite
        )

    def body_fun(carry):
        head, xs_now, scale_now = schedule.in_flight(carry.schedule, init, xs, scale)
        offset = schedule.offset(carry.schedule)
        first = carry.first
        delta = method.propose(layout, carry.transition, carry.residual, carry.policy)
        # The first pass: the guess itself, evaluated below and always accepted.
        candidate = jnp.where(first, carry.states, carry.states + delta)
        first_bad = layout.first_false(jnp.all(jnp.isfinite(candidate), axis=-1))
        cut = jnp.minimum(method.cut(layout, carry.prefix, carry.policy), first_bad)
        if schedule.narrows:
            limit = schedule.limit(carry.schedule, carry.prefix)
            cut = jnp.minimum(cut, limit)
        cut = jnp.where(first, length, cut)
        # Everything past the cut is unknown: continue it as a constant (a fresh flat
        # guess; an undamped update is exact at least one step past the prefix, so
        # progress is kept).
        anchor = layout.state_at(head, candidate, cut)
        candidate = jnp.where((index >= cut)[:, None], anchor, candidate)
        if schedule.narrows:
            # Past the window the iterate is held: the update there is not trusted.
            held = schedule.held(carry.schedule, carry.states)
            candidate = jnp.where((index >= limit)[:, None], held, candidate)
        # The residual first; the transitions (Newton's Jacobians: the expensive
        # part) only below, once the iteration is known to go on from here.
        f = jax.vmap(step)(layout.previous(head, candidate), xs_now)
        residual, merit, prefix = measure(candidate, f, scale_now)
        accept, policy = method.judge(
            layout,
            carry.policy,
            cut=cut,
            prefix=carry.prefix,
            transition=carry.transition,
            delta=delta,
            old_residual=carry.residual,
            old_merit=carry.merit,
            residual=residual,
            merit=merit,
        )
        accept = accept | first
        policy = jtu.tree_map(
            lambda old, new: jnp.where(first, old, new), carry.policy, policy
        )

        def pick(new, old):
            return jnp.where(accept, new, old)

        tol = tolerance(candidate, scale_now)
        small = within(candidate - carry.states, tol) & within(residual, tol)
        # (A step is settled after a small update: not on the first pass.)
        settled = pick(
            jnp.where(first, carry.settled, layout.first_false(small)), carry.settled
        )
        states = pick(candidate, carry.states)
        residual = pick(residual, carry.residual)
        merit = pick(merit, carry.merit)
        prefix = pick(prefix, carry.prefix)
        iteration = carry.iteration + (~first).astype(carry.iteration.dtype)

        # Hopeless case: at the rates at which the converged prefix (of the whole
        # sequence), the merit and the trusted frontier progressed over the last
        # `window_size` iterations, the iteration would not finish within the cap.
        # Any one rate suffices to go on. (The merit must fall to at most
        # `½ Σ tol²`, a necessary condition for convergence. The frontier is the
        # prefix plus the horizon the method trusts its next update over: while an
        # undamped update is trusted over a few steps only, the prefix creeps and
        # the merit is that of a constant continuation past them, so that a
        # contracting recurrence from a poor guess — an RNN with unstable Jacobians
        # at the guess — makes its progress there: the horizon doubles every other
        # iteration, then the prefix and merit follow. On a chaotic recurrence it
        # stays a few steps long and moves with the prefix.)
        reached = offset + prefix
        trusted = jnp.minimum(method.cut(layout, prefix, policy), length)
        if schedule.narrows:
            trusted = jnp.minimum(trusted, schedule.limit(carry.schedule, prefix))
        frontier = offset + trusted

        def needs_to_end(progress, past):
            # Iterations to reach the end at the rate of the last window; infinite
            # without progress.
            rate = (progress - past).astype(dtype) / window_size
            to_go = (total - progress).astype(dtype)
            return jnp.where(rate > 0, to_go / jnp.maximum(rate, eps), jnp.inf)

        needs = jnp.where(
            reached == total, 0, needs_to_end(reached, carry.past_prefix[0])
        )
        target = layout.merit(tolerance(states, scale_now))
        merit_rate = jnp.log(carry.past_merit[0] / merit) / window_size
        merit_rate = jnp.where(jnp.isfinite(merit_rate), merit_rate, 0)
        merit_needs = jnp.log(jnp.maximum(merit, target) / target) / jnp.maximum(
            merit_rate, eps
        )
        needs = jnp.minimum(needs, merit_needs)
        if rule.frontier and method.rejections_are_hopeless:
            # (A damped method's updates are trusted over every step: no frontier.)
            # Zero once it reached the end, for one more window: then the prefix
            # and the merit are judged over iterations that trusted every step.
            needs = jnp.minimum(needs, needs_to_end(frontier, carry.past_frontier[0]))
        left = (carry.cap - iteration).astype(dtype)
        # A rejected undamped update measured how far the linearisation can be
        # trusted (the horizon shrank 4x); it is not judged for progress. (Damped
        # methods reject routinely while their damping adapts: every iteration
        # counts.)
        counts_all = rule.rejections_wait or not method.rejections_are_hopeless
        waits = jnp.asarray(True) if counts_all else accept
        waits = waits & ~first
        waited = carry.waited + waits.astype(jnp.int32)
        hopeless = waits & (waited >= window_size) & (needs > left)
        lyapunov = carry.lyapunov
        if rule.contracting or horizon_growth:
            # The rates judge a predictable recurrence too early where its progress
            # accelerates: the damped pendulum in 100 steps of 1 (its horizon
            # trusted over 3-12 steps for 17 iterations, then doubling to the end:
            # converged in 21) and an RNN that contracts along its trajectory from
            # a guess where it does not (T = 10⁵: its horizon doubling from 97
            # steps at iteration 6, the prefix 6 steps long at iteration 10,
            # converged in 31). Asked only when the rates say hopeless (the
            # estimate costs a pass over the transitions): along the converged
            # prefix, the exact trajectory, a negative Lyapunov estimate means a
            # contracting recurrence, whose Newton-type iteration converges in a
            # number of iterations that does not grow with T: it goes on. A
            # positive one means errors grow along it (chaos: the horizon can
            # double for a while, up to a few Lyapunov times, and then stalls):
            # hopeless. Unknown (a prefix too short), the horizon's growth over the
            # last window decides: at its factor per iteration, would the frontier
            # reach the end within the cap?
            estimate = jax.lax.cond(
                unvmap_any(hopeless),
                lambda: lyapunov_estimate(
                    carry.transition,
                    carry.linearised_prefix,
                    carry.linearised_prefix >= _LYAPUNOV_STEPS,
                ),
                lambda: jnp.asarray(jnp.nan, dtype),
            )
            lyapunov = jnp.where(jnp.isnan(estimate), lyapunov, estimate)
            if rule.contracting:
                hopeless = hopeless & ~(estimate < 0)
            if horizon_growth:
                # The horizons (frontier - prefix) now and `window_size - 1`
                # counted iterations ago (the oldest entry precedes the first
                # update: no horizon was trusted yet).
                horizon = (frontier - reached).astype(dtype)
                then = (carry.past_frontier[1] - carry.past_prefix[1]).astype(dtype)
                factor = jnp.log(horizon / jnp.maximum(then, 1)) / (window_size - 1)
                growth_needs = jnp.where(
                    (then > 0) & (factor > 0),
                    jnp.log((total - reached).astype(dtype) / jnp.maximum(horizon, 1))
                    / jnp.maximum(factor, eps),
                    jnp.inf,
                )
                goes_on_growing = growth_needs <= left
                if horizon_growth == "gated":
                    goes_on_growing = goes_on_growing & ~(estimate > 0)
                hopeless = hopeless & ~goes_on_growing
        rejections = jnp.where(accept, 0, carry.rejections + 1)
        if method.rejections_are_hopeless:
            if rule.max_rejections is None:
                # Rejected over one step past the prefix, where an undamped update
                # is exact: the recurrence itself is not finite there.
                hopeless = hopeless | (~accept & (cut - carry.prefix <= 1))
            else:
                hopeless = hopeless | (rejections >= rule.max_rejections)
        if not method.fallback:
            # Without a fallback, stopping early only turns a possible success into
            # a certain failure.
            hopeless = jnp.array(False)

        def remember(past, value):
            kept = jnp.where(waits, jnp.concatenate([past[1:], value[None]]), past)
            # After the first pass, the guess's values stand for every past one.
            return jnp.where(first, jnp.broadcast_to(value, past.shape), kept)

        past_prefix = remember(carry.past_prefix, reached)
        past_merit = remember(carry.past_merit, merit)
        # Before the first update only the prefix is trusted.
        past_frontier = remember(
            carry.past_frontier, jnp.where(first, reached, frontier)
        )
        new_cap = carry.cap
        schedule_state = carry.schedule
        if schedule.narrows:
            # Hopeless over the window (unless it is as narrow as it gets), or too
            # slow for it: narrow it and go on, with fresh patience.
            narrowed, narrowed_state, narrowed_cap = schedule.narrow(
                carry.schedule, iteration, reached, hopeless
            )
            hopeless = hopeless & ~narrowed
            rejections = jnp.where(narrowed, 0, rejections)
            past_prefix = jnp.where(narrowed, reached, past_prefix)
            past_merit = jnp.where(narrowed, merit, past_merit)
            past_frontier = jnp.where(narrowed, frontier, past_frontier)
            new_cap = jnp.where(narrowed, narrowed_cap, new_cap)
            waited = jnp.where(narrowed, 0, waited)
            schedule_state = jtu.tree_map(
                lambda a, b: jnp.where(narrowed, a, b), narrowed_state, schedule_state
            )
        # Move on and linearise at the accepted iterate only if there will be a next
        # iteration: a rejected candidate, the last iterate and a hopeless one need
        # none. (On Lorenz-63 this skips two of the three Jacobian evaluations.)
        done = offset + settled == total
        goes_on = accept & (iteration < new_cap) & ~done & ~hopeless

        def go_on():
            sched, moved, shift = schedule.advance(schedule_state, states, settled)
            head, xs_now, scale_now = schedule.in_flight(sched, init, xs, scale)
            prev = layout.previous(head, moved)
            if schedule.moves:
                # New steps entered: their transitions, residuals (and the merit)
                # are new.
                f, transition = method.linearise(step, prev, xs_now)
                measured = measure(moved, f, scale_now)
            else:
                # The steps were evaluated at this iterate above.
                transition = method.relinearise(
                    step, prev, xs_now, carry.transition, policy, first
                )
                measured = (residual, merit, prefix)
            return (sched, moved, transition, *measured, settled - shift, shift)

        def stop():
            zero = jnp.asarray(0, jnp.int32)
            kept = (schedule_state, states, carry.transition, residual, merit)
            return (*kept, prefix, settled, zero)

        # The predicate is unbatched under `jax.vmap` (any problem of the batch goes
        # on), so that the cond stays a cond: a batched one would evaluate both
        # branches, and linearise after every last iteration. The problems of the
        # batch that stop keep `stop`'s values.
        sched, states, transition, residual, merit, prefix, settled, shift = (
            jax.lax.cond(
                unvmap_any(goes_on),
                lambda: batch_where(goes_on, go_on(), stop()),
                stop,
            )
        )
        return _Carry(
            iteration=iteration,
            states=states,
            transition=transition,
            residual=residual,
            merit=merit,
            prefix=prefix,
            linearised_prefix=jnp.where(goes_on, prefix, carry.linearised_prefix),
            settled=settled,
            schedule=sched,
            advances=carry.advances + (shift > 0).astype(jnp.int32),
            policy=policy,
            past_prefix=past_prefix,
            past_merit=past_merit,
            past_frontier=past_frontier,
            rejections=rejections,
            hopeless=hopeless,
            cap=new_cap,
            waited=waited,
            lyapunov=lyapunov,
            first=jnp.asarray(False),
        )

    sched, states = schedule.start(init, guess)
    head, xs_now, scale_now = schedule.in_flight(sched, init, xs, scale)
    prev = layout.previous(head, states)

    # The guess is evaluated and linearised by the loop's first pass. Until then the
    # residuals are unknown (NaN: no step is within tolerance), and the transitions a
    # placeholder. A window given up on keeps them: nothing is evaluated, and the
    # fallback computes every step (a pass over all the steps to find the guess's
    # exact prefix cost 0.7x a sequential solve on Lorenz-63).
    shapes = jax.eval_shape(lambda: method.linearise(step, prev, xs_now))[1]
    transition = jtu.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
    residual, merit, prefix = measure(states, jnp.full_like(states, jnp.nan), scale_now)
    carry = _Carry(
        iteration=count(0),
        states=states,
        transition=transition,
        residual=residual,
        merit=merit,
        prefix=prefix,
        linearised_prefix=prefix,
        # At least one iteration: a step is settled after a small update.
        settled=count(0),
        schedule=sched,
        advances=count(0),
        policy=method.init_policy(length, dtype),
        past_prefix=jnp.broadcast_to(prefix, (window_size,)),
        past_merit=jnp.broadcast_to(merit, (window_size,)),
        past_frontier=jnp.broadcast_to(prefix, (window_size,)),
        rejections=count(0),
        hopeless=give_up,
        cap=count(cap),
        waited=count(0),
        lyapunov=jnp.asarray(jnp.nan, dtype),
        first=jnp.asarray(True),
    )
    carry = jax.lax.while_loop(cond_fun, body_fun, carry)
    states = carry.states
    # Where the fallback starts: after the leading steps that are exact to rounding,
    # not merely within tolerance. Residuals within tolerance near the front of the
    # prefix are errors that the remaining steps would amplify (by e^{λ·time} on a
    # chaotic system: 1e-10 becomes 1e-3 over 20 Lorenz time units), so that the
    # fallback would not reproduce the sequential answer. Newton-type iterations
    # reach rounding level one iteration after tolerance, so this costs few extra
    # sequential steps. The residuals of the last iterate are in the carry. (Steps
    # that the schedule moved past were settled: their update was within tolerance
    # too, so a Newton-type update made them exact to rounding.) Where the last
    # trust horizon fell short of the end, the linearisation was seen to amplify
    # errors more than 100-fold within it, and rounding errors would be amplified
    # as much: the fallback then starts after the steps whose residual is exactly
    # zero (the logistic map, r = 3.9, given up on after a few iterations: an
    # error of 0.9 from a restart 100 ulps off, none from there).
    exact = min(atol, 100 * eps) + min(rtol, 100 * eps) * jnp.abs(states)
    if _HOPELESS.restart_trusted_only:
        covered = method.cut(layout, carry.prefix, carry.policy) >= length
        exact = jnp.where(covered, exact, 0)
    exact_prefix = jnp.minimum(
        layout.first_false(within(carry.residual, exact)), carry.prefix
    )
    offset = schedule.offset(carry.schedule)
    prefix = jnp.where(converged(carry), total, offset + exact_prefix)
    # A non-finite `init`: no iteration ran; every step is computed sequentially, as
    # `jax.lax.scan` would (the finite components of the state stay exact).
    prefix = jnp.where(init_finite, prefix, 0)
    states = schedule.finish(carry.schedule, states)

    if method.fallback:
        # Exact sequential completion from the converged prefix; zero trips if none.
        result = RESULTS.successful
        start = prefix
    else:
        diverged = ~jnp.isfinite(carry.merit)
        result = RESULTS.where(
            converged(carry),
            RESULTS.successful,
            RESULTS.where(
                diverged,
                RESULTS.nonlinear_divergence,
                RESULTS.nonlinear_max_steps_reached,
            ),
        )
        start = jnp.where(init_finite, total, 0)
    states = layout.complete(step, init, xs, states, start)
    result = RESULTS.where(init_finite, result, RESULTS.nonfinite_input)
    # The Lyapunov estimate at the last linearised iterate. Converged: along all of
    # it. Otherwise along its converged prefix only, where it is the exact
    # trajectory (past it, an iterate that was given up on can read +0.01 per step
    # where the trajectory contracts at -0.35); if that is too short (a window
    # that moved past the steps it converged), the hopeless-case test's last one;
    # NaN if none.
    done = converged(carry)
    used = jnp.where(done, layout.length, carry.linearised_prefix)
    lyapunov = lyapunov_estimate(
        carry.transition, used, ~give_up & (done | (used >= _LYAPUNOV_STEPS))
    )
    lyapunov = jnp.where(jnp.isnan(lyapunov), carry.lyapunov, lyapunov)
    stats = Stats(
        num_iterations=carry.iteration,
        num_advances=carry.advances + 1,
        num_sequential_steps=(total - start).astype(jnp.int32),
        fallback_start=start.astype(jnp.int32),
        length=total,
        result=result,
        lyapunov=lyapunov.astype(dtype),
        window=schedule.width(carry.schedule),
    )
    return states, stats
