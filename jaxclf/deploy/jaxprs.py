"""Walking a traced JAX program: the nested programs of call-like primitives, and re-evaluation of a
program with some equations computed another way (what a converter cannot take, rewritten before lowering)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax


def inner_jaxpr(params: dict):
    """The (jaxpr, consts) a call-like primitive runs (jit, custom_jvp_call, custom_vjp_call, checkpoint)."""
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        inner = params.get(key)
        if isinstance(inner, jax.extend.core.ClosedJaxpr):
            return inner.jaxpr, inner.consts
        if isinstance(inner, jax.extend.core.Jaxpr):
            return inner, []
    return None


# (equation, its input values) -> its output values computed another way, or None to compute it as traced.
Replacement = Callable[[object, list], list | None]


def evaluate(jaxpr, consts: Sequence, args: Sequence, replace: Replacement) -> list:
    """The outputs of `jaxpr` on `args` (traceable: call it under jax.jit), nested programs inlined, with each
    equation that `replace` answers for computed its way."""
    env = dict(zip([*jaxpr.constvars, *jaxpr.invars], [*consts, *args]))

    def read(atom):
        return atom.val if isinstance(atom, jax.extend.core.Literal) else env[atom]

    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        inner = inner_jaxpr(eqn.params)
        outs = evaluate(*inner, ins, replace) if inner is not None else replace(eqn, ins)
        if outs is None:
            outs = eqn.primitive.bind(*ins, **eqn.primitive.get_bind_params(eqn.params))
            outs = outs if eqn.primitive.multiple_results else [outs]
        env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]
