"""Limits on one chat-template render: a Jinja sandbox whose renders stop.

A chat template is code, the model's own or (with ``--trust-request-chat-template``)
a client's. ``jinja2.sandbox`` keeps it away from Python internals, not from looping
for ever or building a string of gigabytes. A render in a worker thread cannot be
killed, so the render itself is made to stop, checked as it runs:

- steps: each ``for`` iteration (the body starts with a step; a filtered loop also
  pays for the items it skips) and each call (macros, methods, ``loop()``) costs
  one, up to ``max_steps``;
- time: the deadline is checked at every step and every output chunk;
- size: the output (streamed through ``Template.generate``) and every string, list
  or dict built by ``+``, ``*``, ``%``, ``~``, a filter or a call stay within
  ``max_chars``; all text written, into macro and block buffers too, within four
  times that. Operations whose result would pass it (``'x' * 10**9``,
  ``'%999999999s' % x``, ``s.center(10**9)``, ``'' | replace('', big)``, a join of
  a list of big strings) are refused before they run.

How: the template's syntax tree is rewritten before it is compiled (the steps in
loops, ``~`` results and written text checked), the sandbox's ``call`` and ``call_binop`` hooks count
and check, and every filter is wrapped. Wrapped filters take the context, which
also keeps Jinja from running them at compile time, outside any budget. The budget
of the render in progress is a ContextVar: the compiled template is shared by every
render, in every thread.

What is left: one C-level operation runs to its end between two checks. The
pre-checks bound its inputs, so its cost is bounded by ``max_chars``, not by the
template; that is why templates sent in requests stay refused by default.
"""

from __future__ import annotations

import contextvars
import functools
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import jinja2
import jinja2.nodes as nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from lmfleet.errors import ConfigError

#: integers in templates stay below 2**this (big-int arithmetic is quadratic)
_MAX_INT_BITS = 1 << 16
#: ``tojson(indent=...)`` beyond this multiplies the output by the nesting depth
_MAX_JSON_INDENT = 64
#: text written anywhere (macro and block buffers included) may reach this many prompts
_WRITE_FACTOR = 4
_SIZED = (str, list, dict, tuple, bytes, set, frozenset)
_STEP_FILTER = "_lmfleet_step"
_METER_FILTER = "_lmfleet_metered"
_CAP_FILTER = "_lmfleet_capped"
_WRITE_FILTER = "_lmfleet_written"


@dataclass(frozen=True, slots=True)
class RenderLimits:
    """What one render may cost. The defaults leave room for a conversation filling
    the largest request body (8 MiB: some ten thousand steps, well under a second)
    and stop a loop bomb within about a second."""

    timeout_s: float = 2.0
    max_chars: int = 16 * 2**20
    max_steps: int = 1_000_000

    def __post_init__(self) -> None:
        for name in ("timeout_s", "max_chars", "max_steps"):
            if not getattr(self, name) > 0:
                raise ConfigError(
                    f"chat template {name} must be positive, got {getattr(self, name)}"
                )


class RenderLimitExceeded(Exception):
    """A render passed one of its limits; the message says which and how to stay under it."""


class _Budget:
    __slots__ = ("deadline", "limits", "steps_left", "written_left")

    def __init__(self, limits: RenderLimits) -> None:
        self.limits = limits
        self.deadline = time.monotonic() + limits.timeout_s
        self.steps_left = limits.max_steps
        self.written_left = limits.max_chars * _WRITE_FACTOR

    def step(self) -> None:
        self.steps_left -= 1
        if self.steps_left < 0:
            raise RenderLimitExceeded(
                f"the chat template ran more than {self.limits.max_steps} steps (loop "
                "iterations and calls)"
            )
        self.check_time()

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise RenderLimitExceeded(
                f"the chat template took longer than {self.limits.timeout_s:g} s to render"
            )

    def check_size(self, size: int, what: str = "a value") -> None:
        if size > self.limits.max_chars:
            raise RenderLimitExceeded(
                f"the chat template built {what} longer than {self.limits.max_chars} characters"
            )

    def write(self, size: int) -> None:
        self.written_left -= size
        if self.written_left < 0:
            raise RenderLimitExceeded(
                f"the chat template wrote more than {self.limits.max_chars * _WRITE_FACTOR} "
                "characters (its own buffers included)"
            )

    def check_value(self, value: Any) -> None:
        if type(value) in _SIZED or isinstance(value, _SIZED):
            if len(value) > self.limits.max_chars:
                self.check_size(len(value))
        elif isinstance(value, int) and value.bit_length() > _MAX_INT_BITS:
            _too_big_int()

    def check_int_args(self, args: Iterable[Any]) -> None:
        """Widths, counts and repeats above ``max_chars`` can only build something too big."""
        for a in args:
            if isinstance(a, int) and not isinstance(a, bool) and a > self.limits.max_chars:
                raise RenderLimitExceeded(
                    f"the chat template passed {a} as an argument; the limit is "
                    f"{self.limits.max_chars}"
                )

    def check_format(self, fmt: str) -> None:
        """A format string whose width or precision alone passes ``max_chars``."""
        for digits in re.findall(r"\d{7,}", fmt):
            self.check_int_args([int(digits)])


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar(
    "lmfleet_template_budget", default=None
)


def render(template: jinja2.Template, variables: Mapping[str, Any], limits: RenderLimits) -> str:
    """``template`` rendered within ``limits`` (``RenderLimitExceeded`` otherwise)."""
    budget = _Budget(limits)
    token = _BUDGET.set(budget)
    try:
        parts: list[str] = []
        size, max_chars, deadline = 0, limits.max_chars, budget.deadline
        for chunk in template.generate(**variables):
            size += len(chunk)
            if size > max_chars:
                budget.check_size(size, "a prompt")
            if time.monotonic() > deadline:
                budget.check_time()
            parts.append(chunk)
        return "".join(parts)
    finally:
        _BUDGET.reset(token)


def compile_guarded(
    source: str, *, setup: Callable[[jinja2.Environment], None], **options: Any
) -> jinja2.Template:
    """``source`` compiled in a guarded sandbox; ``setup`` adds globals and filters
    (its filters are wrapped too)."""
    env = _GuardedEnvironment(**options)
    setup(env)
    for name, func in list(env.filters.items()):
        env.filters[name] = _guard_filter(name, func)
    env.filters[_STEP_FILTER] = _step
    env.filters[_METER_FILTER] = _metered_filter
    env.filters[_CAP_FILTER] = _capped
    env.filters[_WRITE_FILTER] = _written
    tree = _Instrument().visit(env.parse(source))
    return env.from_string(tree)


# ---- the sandbox --------------------------------------------------------------------------
class _GuardedEnvironment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        budget = _BUDGET.get()
        if budget is not None:
            budget.step()
            _precheck_call(budget, __obj, args, kwargs)
        result = super().call(__context, __obj, *args, **kwargs)
        if budget is not None:
            budget.check_value(result)
        return result

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        budget = _BUDGET.get()
        if budget is not None and operator != "+":  # a sum is at most twice the limit
            _precheck_binop(budget, operator, left, right)
        result = super().call_binop(context, operator, left, right)
        if budget is not None:
            budget.check_value(result)
        return result


def _too_big_int() -> None:
    raise RenderLimitExceeded(f"the chat template built an integer larger than 2**{_MAX_INT_BITS}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _precheck_binop(budget: _Budget, operator: str, left: Any, right: Any) -> None:
    if operator == "*":
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, str | list | tuple) and _is_int(n):
                budget.check_size(len(seq) * max(n, 0))
        ints = _is_int(left) and _is_int(right)
        if ints and left.bit_length() + right.bit_length() > _MAX_INT_BITS:
            _too_big_int()
    elif operator == "**":
        ints = _is_int(left) and _is_int(right) and right > 0 and abs(left) > 1
        if ints and left.bit_length() * right > _MAX_INT_BITS:
            _too_big_int()
    elif operator == "%" and isinstance(left, str):
        budget.check_format(left)
        budget.check_int_args(right if isinstance(right, tuple) else (right,))


def _precheck_call(
    budget: _Budget, obj: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    target = getattr(obj, "__wrapped__", obj)  # the sandbox wraps str.format
    owner = getattr(target, "__self__", None)
    if not isinstance(owner, str):
        return
    budget.check_int_args((*args, *kwargs.values()))
    name = getattr(target, "__name__", "")
    if name in ("format", "format_map"):
        budget.check_format(owner)
    elif name == "replace" and len(args) >= 2:
        _precheck_replace(budget, owner, args[0], args[1])
    elif name == "join" and args:
        _precheck_join(budget, owner, args[0])
    elif name == "expandtabs":
        size = args[0] if args else kwargs.get("tabsize", 8)
        if _is_int(size):
            budget.check_size(len(owner) + owner.count("\t") * size)


def _precheck_replace(budget: _Budget, s: Any, old: Any, new: Any) -> None:
    if isinstance(s, str) and isinstance(old, str) and isinstance(new, str):
        count = len(s) + 1 if not old else s.count(old)
        budget.check_size(len(s) + count * len(new))


def _precheck_join(budget: _Budget, sep: Any, items: Any) -> None:
    if isinstance(items, list | tuple):
        size = sum(len(x) for x in items if isinstance(x, str))
        budget.check_size(size + len(items) * len(str(sep)))


# ---- filters ------------------------------------------------------------------------------
def _guard_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """``func`` with its arguments and result checked against the render's budget."""
    kind = getattr(func, "jinja_pass_arg", None)
    pass_arg = None if kind is None else kind.name  # context, eval_context or environment

    @jinja2.pass_context
    @functools.wraps(func)
    def guarded(context: Any, value: Any, *args: Any, **kwargs: Any) -> Any:
        budget = _BUDGET.get()
        if budget is not None:
            budget.check_int_args((*args, *kwargs.values()))
            _precheck_filter(budget, name, value, args, kwargs)
        if pass_arg == "context":
            result = func(context, value, *args, **kwargs)
        elif pass_arg == "eval_context":
            result = func(context.eval_ctx, value, *args, **kwargs)
        elif pass_arg == "environment":
            result = func(context.environment, value, *args, **kwargs)
        else:
            result = func(value, *args, **kwargs)
        if budget is None:
            return result
        if isinstance(result, Iterator):  # map, select ...: lazy, so metered item by item
            return _metered(budget, result)
        budget.check_value(result)
        return result

    return guarded


def _precheck_filter(
    budget: _Budget, name: str, value: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    if name == "format" and isinstance(value, str):
        budget.check_format(value)
    elif name == "replace" and len(args) >= 2:
        _precheck_replace(budget, value, args[0], args[1])
    elif name == "join":
        _precheck_join(budget, args[0] if args else kwargs.get("d", ""), value)
    elif name == "indent" and isinstance(value, str):
        width = args[0] if args else kwargs.get("width", 4)
        width_len = width if _is_int(width) else len(str(width))
        budget.check_size(len(value) + (value.count("\n") + 1) * width_len)
    elif name == "tojson":
        indent = kwargs["indent"] if "indent" in kwargs else (args[1] if len(args) > 1 else None)
        width = len(indent) if isinstance(indent, str) else indent
        if _is_int(width) and width > _MAX_JSON_INDENT:
            raise RenderLimitExceeded(
                f"tojson indent may be at most {_MAX_JSON_INDENT}, got {indent!r}"
            )


def _metered(budget: _Budget, items: Iterator[Any]) -> Iterator[Any]:
    """A lazy sequence whose items cost a step each and whose strings, together,
    stay under the size limit (a later join of them cannot pass it)."""
    total = 0
    for item in items:
        budget.step()
        if isinstance(item, str):
            total += len(item)
            budget.check_size(total)
        yield item


@jinja2.pass_context
def _step(context: Any, value: Any) -> str:
    budget = _BUDGET.get()
    if budget is not None:
        budget.step()
    return ""


@jinja2.pass_context
def _metered_filter(context: Any, value: Any) -> Any:
    budget = _BUDGET.get()
    return value if budget is None else _metered(budget, iter(value))


@jinja2.pass_context
def _written(context: Any, value: Any) -> str:
    text = value if isinstance(value, str) else str(value)
    budget = _BUDGET.get()
    if budget is not None:
        budget.write(len(text))
    return text


@jinja2.pass_context
def _capped(context: Any, value: Any) -> Any:
    budget = _BUDGET.get()
    if budget is not None:
        budget.check_value(value)
    return value


def _filter(node: nodes.Expr, name: str, lineno: int) -> nodes.Filter:
    return nodes.Filter(node, name, [], [], None, None, lineno=lineno)


class _Instrument(NodeTransformer):
    """Each ``for`` body starts with a step (filtered loops meter what they skip);
    each ``~`` result is checked against the size limit; each piece of output,
    wherever it goes (the prompt, a macro's or a block's buffer), is counted."""

    def visit_Output(self, node: nodes.Output) -> nodes.Output:
        self.generic_visit(node)
        node.nodes = [_filter(n, _WRITE_FILTER, n.lineno) for n in node.nodes]
        return node

    def visit_For(self, node: nodes.For) -> nodes.For:
        self.generic_visit(node)
        step = nodes.ExprStmt(_filter(nodes.Const(None), _STEP_FILTER, node.lineno))
        step.set_lineno(node.lineno)
        node.body.insert(0, step)
        if node.test is not None:
            node.iter = _filter(node.iter, _METER_FILTER, node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Filter:
        self.generic_visit(node)
        return _filter(node, _CAP_FILTER, node.lineno)
