"""Evaluating the `.moedef` expression language: a tree walk over the IR, never Python `eval`.

Names are `i` (the decoder-layer index), `config` (the model's config), and the definition's
`let` names. `a ?? b` is `b` when `a` is missing or none. Only numbers, strings, booleans,
none and lists exist; a handful of built-in functions are allowed. Every failure is a
`MoedslError` pointing at the sub-expression that failed.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Mapping

from moedsl.errors import MoedslError, nearest
from moedsl.lang import ir

MAX_RANGE = 1_000_000


class Missing(MoedslError):
    """A config attribute (or index) that is not there; `??` catches it."""


def _config_keys(obj: Any) -> list[str]:
    if isinstance(obj, Mapping):
        return [str(k) for k in obj]
    to_dict = getattr(obj, "to_dict", None)
    keys = set(to_dict()) if callable(to_dict) else set()
    keys |= {k for k in getattr(obj, "__dict__", {}) if not k.startswith("_")}
    keys |= set(getattr(type(obj), "attribute_map", {}) or {})
    return sorted(keys)


def _type_name(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float, str)):
        return type(v).__name__
    if isinstance(v, (list, tuple)):
        return "list"
    return "config"


@dataclass
class Env:
    """What names mean while evaluating: the layer index, the config and the `let` bindings."""

    config: Any
    i: int | None = None
    lets: Mapping[str, ir.Expr] = field(default_factory=dict)
    _cache: dict[tuple[str, int | None], Any] = field(default_factory=dict)
    _active: set[str] = field(default_factory=set)

    def at(self, i: int) -> "Env":
        return Env(self.config, i, self.lets)


def _number(v: Any, e: ir.Expr, what: str) -> int | float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise MoedslError(f"{what} needs a number, got {_type_name(v)} `{v!r}`", span=e.span)
    return v


def evaluate(e: ir.Expr, env: Env) -> Any:
    """The value of `e` in `env`; every failure is a located `MoedslError`."""
    try:
        return _evaluate(e, env)
    except RecursionError:  # an IR built in code, or lets that nest very deeply
        raise MoedslError("expression nested too deeply to evaluate", span=getattr(e, "span", None)) from None


def _evaluate(e: ir.Expr, env: Env) -> Any:
    if isinstance(e, ir.Literal_):
        return e.value
    if isinstance(e, ir.Name):
        if e.id == "i":
            if env.i is None:
                raise MoedslError("`i` (the layer index) has no value here: this expression is not about one layer",
                                  span=e.span)
            return env.i
        if e.id == "config":
            return env.config
        if e.id in env.lets:
            key = (e.id, env.i)  # a let may depend on `i`: remember its value per layer index
            if key in env._cache:
                return env._cache[key]
            if e.id in env._active:
                raise MoedslError(f"`let {e.id}` refers to itself", span=e.span)
            env._active.add(e.id)
            try:
                value = _evaluate(env.lets[e.id], env)
            finally:
                env._active.discard(e.id)
            env._cache[key] = value
            return value
        names = ["i", "config", *env.lets]
        raise MoedslError(f"unknown name `{e.id}`", span=e.span, expected=names, suggestion=nearest(e.id, names))
    if isinstance(e, ir.Attr):
        obj = _evaluate(e.obj, env)
        return _attr(obj, e)
    if isinstance(e, ir.Index):
        obj, key = _evaluate(e.obj, env), _evaluate(e.index, env)
        try:
            if isinstance(obj, Mapping):
                return _plain(obj[key])
            if isinstance(obj, (list, tuple, str)) and isinstance(key, int) and not isinstance(key, bool):
                return _plain(obj[key])
        except (IndexError, KeyError):
            raise Missing(f"index {key!r} is out of range (length {len(obj)})", span=e.span) from None
        except TypeError:  # e.g. a list as a key
            pass
        raise MoedslError(f"cannot index {_type_name(obj)} with {_type_name(key)}", span=e.span)
    if isinstance(e, ir.ListExpr):
        return [_evaluate(x, env) for x in e.items]
    if isinstance(e, ir.Call):
        return _call(e, [_evaluate(a, env) for a in e.args])
    if isinstance(e, ir.Unary):
        v = _evaluate(e.operand, env)
        if e.op == "not":
            return not _truth(v, e.operand)
        return -_number(v, e.operand, "`-`")
    if isinstance(e, ir.Binary):
        return _binary(e, env)
    raise MoedslError(f"cannot evaluate {type(e).__name__}", span=getattr(e, "span", None))  # pragma: no cover


def _truth(v: Any, e: ir.Expr) -> bool:
    if isinstance(v, (bool, int, float, str, list, tuple)) or v is None:
        return bool(v)
    raise MoedslError(f"a condition must be true/false, got {_type_name(v)}", span=e.span)


def _attr(obj: Any, e: ir.Attr) -> Any:
    if obj is None:
        raise Missing(f"`{e.attr}`: the value before it is none", span=e.span)
    if isinstance(obj, (bool, int, float, str, list, tuple)):
        raise MoedslError(f"{_type_name(obj)} has no attribute `{e.attr}`", span=e.span)
    if isinstance(obj, Mapping):
        if e.attr in obj:
            return _plain(obj[e.attr])
    else:
        try:
            value = getattr(obj, e.attr)
        except AttributeError:
            value = _MISSING
        except Exception as err:  # a config property that raises is still a located error
            raise MoedslError(f"reading config `{e.attr}` failed: {err}", span=e.span) from None
        if value is not _MISSING and not callable(value):
            return _plain(value)
    keys = _config_keys(obj)
    raise Missing(f"config has no attribute `{e.attr}`", span=e.span, suggestion=nearest(e.attr, keys))


_MISSING = object()


def _plain(v: Any) -> Any:
    if isinstance(v, tuple):
        return list(v)
    return v


def _call(e: ir.Call, args: list[Any]) -> Any:
    f = e.func

    def need(n: int) -> None:
        if len(args) != n:
            raise MoedslError(f"`{f}` takes {n} argument(s), got {len(args)}", span=e.span)

    if f == "len":
        need(1)
        if not isinstance(args[0], (list, tuple, str)):
            raise MoedslError(f"`len` needs a list or string, got {_type_name(args[0])}", span=e.span)
        return len(args[0])
    if f in ("min", "max"):
        vals = args[0] if len(args) == 1 and isinstance(args[0], list) else args
        if not vals:
            raise MoedslError(f"`{f}` of nothing", span=e.span)
        return (min if f == "min" else max)(_number(v, e, f"`{f}`") for v in vals)
    if f == "abs":
        need(1)
        return abs(_number(args[0], e, "`abs`"))
    if f == "floordiv":
        need(2)
        a, b = (_number(v, e, "`floordiv`") for v in args)
        if b == 0:
            raise MoedslError("division by zero", span=e.span)
        return a // b
    if f == "range":
        if not 1 <= len(args) <= 3:
            raise MoedslError("`range` takes 1 to 3 arguments", span=e.span)
        ints = []
        for v in args:
            n = _number(v, e, "`range`")
            if isinstance(n, float) and not math.isfinite(n):
                raise MoedslError(f"`range` needs finite numbers, got `{n!r}`", span=e.span)
            ints.append(int(n))
        if len(ints) == 3 and ints[2] == 0:
            raise MoedslError("`range` step must not be zero", span=e.span)
        r = range(*ints)
        if len(r) > MAX_RANGE:
            raise MoedslError(f"range of {len(r)} items is too long", span=e.span)
        return list(r)
    if f in ("int", "float", "bool", "str"):
        need(1)
        try:
            return {"int": int, "float": float, "bool": bool, "str": str}[f](args[0])
        except (TypeError, ValueError, OverflowError) as err:
            raise MoedslError(f"`{f}({args[0]!r})` failed: {err}", span=e.span) from None
    raise MoedslError(f"unknown function `{f}`", span=e.span)  # pragma: no cover (the parser refuses it)


_ARITH = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv, "%": operator.mod}
_CMP = {"==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}


def _binary(e: ir.Binary, env: Env) -> Any:
    op = e.op
    if op == "??":
        try:
            left = _evaluate(e.left, env)
        except Missing:
            left = None
        return _evaluate(e.right, env) if left is None else left
    if op == "and":
        return _truth(_evaluate(e.left, env), e.left) and _truth(_evaluate(e.right, env), e.right)
    if op == "or":
        return _truth(_evaluate(e.left, env), e.left) or _truth(_evaluate(e.right, env), e.right)
    left, right = _evaluate(e.left, env), _evaluate(e.right, env)
    if op in ("in", "not in"):
        if right is None:
            found = False  # `i in config.mlp_only_layers` where the list is none: nothing is in it
        elif isinstance(right, (list, tuple)):
            found = left in right
        elif isinstance(right, str) and isinstance(left, str):
            found = left in right
        else:
            raise MoedslError(f"`{op}` needs a list on its right, got {_type_name(right)}", span=e.right.span)
        return found if op == "in" else not found
    if op in ("==", "!="):
        return _CMP[op](left, right)
    if op in _CMP:
        if isinstance(left, str) and isinstance(right, str):
            return _CMP[op](left, right)
        return _CMP[op](_number(left, e.left, f"`{op}`"), _number(right, e.right, f"`{op}`"))
    if op == "+" and isinstance(left, str) and isinstance(right, str):
        if len(left) + len(right) > 10_000:
            raise MoedslError("string too long", span=e.span)
        return left + right
    a, b = _number(left, e.left, f"`{op}`"), _number(right, e.right, f"`{op}`")
    if op in ("/", "%") and b == 0:
        raise MoedslError("division by zero", span=e.span)
    try:
        result = _ARITH[op](a, b)
    except OverflowError:
        raise MoedslError("number too large", span=e.span) from None
    if isinstance(result, int) and abs(result) > 1 << 64:
        raise MoedslError("number too large", span=e.span)
    return result
