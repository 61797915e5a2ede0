"""Targets: boolean formulas over attributes, and the log density ratio ``log r_T`` (spec §3).

A target is written against the attribute names of the heads, e.g. ``"black_hair & male & ~smiling"``,
``"a & (b | c) & ~d"``, or in the paper's form ``"a+b-c"`` (``+`` is AND, a binary ``-`` is AND NOT).
Operators: ``&`` AND, ``|`` OR, ``~`` or ``!`` NOT, parentheses. Precedence, from tightest: NOT, AND
(``&``, ``+``, binary ``-``), OR.

With exact heads, ``g_c(x) = gamma_c * D_r(c|x) = h(x) * 1[c in S(x)]`` where ``gamma_c = pi_c / p_data(c)``
and ``h(x) = p(x) / p_data(x)``. A formula then has an exact ratio to ``p_data``:

- an attribute ``c`` is ``g_c``;
- AND is ``min``; OR is ``max``;
- NOT ``phi`` is ``(h - lambda * g_phi)^+`` with ``h = max_c g_c``;
- an AND with present children ``P`` and negated children ``N`` is the paper's
  ``(min_P g - lambda * max_N g)^+`` (with ``h`` in place of ``min_P`` when ``P`` is empty).

``lambda >= 1`` is the negation margin: 1 is the paper's formula, larger values keep regions that hold a
forbidden attribute out when the heads are imperfect (spec §3). Everything here is computed in log space.
"""

from __future__ import annotations

import difflib
import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "Attr",
    "And",
    "Or",
    "Not",
    "Target",
    "TargetError",
    "parse_target",
    "log_g",
    "log_r",
    "log_w",
    "auto_dr_temperature",
    "temper_dr",
]

_MAX_SATISFIABILITY_CHECK = 16  # attributes up to which "can this target ever hold" is checked exhaustively


class TargetError(ValueError):
    """A target expression that cannot be parsed or can never hold."""


# ----------------------------------------------------------------------------------------------------------
# Expression tree


@dataclass(frozen=True)
class Attr:
    index: int
    name: str

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Not:
    child: Node

    def __str__(self) -> str:
        inner = str(self.child)
        return f"~{inner}" if isinstance(self.child, (Attr, Not)) else f"~({inner})"


@dataclass(frozen=True)
class And:
    children: tuple[Node, ...]

    def __str__(self) -> str:
        return " & ".join(f"({c})" if isinstance(c, Or) else str(c) for c in self.children)


@dataclass(frozen=True)
class Or:
    children: tuple[Node, ...]

    def __str__(self) -> str:
        return " | ".join(str(c) for c in self.children)


Node = Attr | Not | And | Or


def _holds(node: Node, present: frozenset[int]) -> bool:
    """Whether an image with attribute set ``present`` satisfies ``node``."""
    if isinstance(node, Attr):
        return node.index in present
    if isinstance(node, Not):
        return not _holds(node.child, present)
    if isinstance(node, And):
        return all(_holds(c, present) for c in node.children)
    return any(_holds(c, present) for c in node.children)


def _holds_batch(node: Node, attributes: torch.Tensor) -> torch.Tensor:
    """Vectorised [`_holds`] over a boolean tensor of attribute sets (B, n)."""
    if isinstance(node, Attr):
        return attributes[:, node.index]
    if isinstance(node, Not):
        return ~_holds_batch(node.child, attributes)
    parts = torch.stack([_holds_batch(c, attributes) for c in node.children])
    return parts.all(0) if isinstance(node, And) else parts.any(0)


def _literals(node: Node) -> tuple[list[int], list[int]]:
    """For a conjunction of literals: (present indices, absent indices); raises if it is not one."""
    children = node.children if isinstance(node, And) else (node,)
    present, absent = [], []
    for c in children:
        if isinstance(c, Attr):
            present.append(c.index)
        elif isinstance(c, Not) and isinstance(c.child, Attr):
            absent.append(c.child.index)
        else:
            raise TargetError(f"{node} is not a conjunction of attributes and negated attributes")
    return present, absent


@dataclass(frozen=True)
class Target:
    """A parsed target: the expression tree plus the attribute names it was parsed against.

    Use [`parse_target`] to build one. ``target.holds(attribute_set)`` evaluates it on a known attribute set;
    [`log_r`] evaluates its density ratio from the heads' outputs.
    """

    expression: Node
    attribute_names: tuple[str, ...]
    text: str

    def __str__(self) -> str:
        return str(self.expression)

    @property
    def is_conjunction(self) -> bool:
        """Whether the target is the paper's form: present attributes I and absent attributes J."""
        try:
            _literals(self.expression)
        except TargetError:
            return False
        return True

    @property
    def present(self) -> list[str]:
        """Names of the required attributes (conjunction targets only)."""
        return [self.attribute_names[i] for i in _literals(self.expression)[0]]

    @property
    def absent(self) -> list[str]:
        """Names of the forbidden attributes (conjunction targets only)."""
        return [self.attribute_names[i] for i in _literals(self.expression)[1]]

    def holds(self, attributes: Sequence[bool] | Sequence[str] | set[str]) -> bool:
        """Whether an image with these attributes satisfies the target.

        Args:
            attributes: a boolean vector over ``attribute_names``, or the names present.
        """
        attributes = list(attributes)
        if all(isinstance(a, str) for a in attributes) and (attributes or not self.attribute_names):
            present = frozenset(self.attribute_names.index(a) for a in attributes)
        elif len(attributes) == len(self.attribute_names):
            present = frozenset(i for i, a in enumerate(attributes) if bool(a))
        else:
            raise ValueError(
                f"Expected {len(self.attribute_names)} booleans over {list(self.attribute_names)} or a list of "
                f"attribute names, got {attributes!r}."
            )
        return _holds(self.expression, present)

    def holds_batch(self, attributes: torch.Tensor) -> torch.Tensor:
        """Whether each row of a boolean tensor of attribute sets (B, n) satisfies the target (B,)."""
        if attributes.ndim != 2 or attributes.shape[1] != len(self.attribute_names):
            raise ValueError(
                f"attributes must have shape (batch, {len(self.attribute_names)}), got {tuple(attributes.shape)}."
            )
        return _holds_batch(self.expression, attributes.bool())

    def stages(self) -> list[Target]:
        """The targets of sequential refitting (spec §6): one more literal of the top-level AND per stage.

        ``a & b & ~c`` gives ``a``, ``a & b``, ``a & b & ~c``: present literals first, in the order written,
        then negated ones, then any other conjunct. A target that is not an AND is a single stage.
        """
        if not isinstance(self.expression, And):
            return [self]

        def rank(node: Node) -> int:
            if isinstance(node, Attr):
                return 0
            if isinstance(node, Not) and isinstance(node.child, Attr):
                return 1
            return 2

        children = sorted(self.expression.children, key=rank)
        stages = []
        for k in range(1, len(children) + 1):
            part = children[:k]
            if all(isinstance(c, Not) for c in part) and k < len(children):
                continue  # a pure negation is a weak first stage; wait for a positive conjunct
            expression = part[0] if k == 1 else And(tuple(part))
            stages.append(Target(expression, self.attribute_names, str(expression)))
        return stages


# ----------------------------------------------------------------------------------------------------------
# Parsing

_TOKEN = re.compile(r"\s*(?:(?P<name>[A-Za-z0-9_.]+)|(?P<op>[&|~!()+\-]))")


def _tokenize(text: str) -> list[tuple[str, str, int]]:
    tokens, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            bad = text[pos:].lstrip()[:1]
            raise TargetError(
                f"Unexpected character {bad!r} at position {len(text) - len(text[pos:].lstrip())} in target "
                f"{text!r}. Use attribute names with `&` (and), `|` (or), `~` (not) and parentheses, e.g. "
                f"'a & (b | c) & ~d', or the paper's form 'a+b-c'."
            )
        kind = "name" if m.group("name") else "op"
        tokens.append((kind, m.group(kind), m.start(kind)))
        pos = m.end()
    return tokens


class _Parser:
    def __init__(self, text: str, names: Sequence[str]):
        self.text = text
        self.names = list(names)
        self.tokens = _tokenize(text)
        self.i = 0

    def error(self, message: str) -> TargetError:
        return TargetError(f"{message} in target {self.text!r}.")

    def peek(self) -> tuple[str, str, int] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self) -> tuple[str, str, int]:
        token = self.peek()
        if token is None:
            raise self.error("Unexpected end of expression: an attribute name or '(' is missing")
        self.i += 1
        return token

    def parse(self) -> Node:
        if not self.tokens:
            raise TargetError(
                f"The target is empty. Name at least one attribute, e.g. '{self.names[0]}' or "
                f"'{' & '.join(self.names[:2])}'. Known attributes: {self.names}."
            )
        node = self.parse_or()
        if self.peek() is not None:
            kind, value, pos = self.peek()
            raise self.error(f"Unexpected {value!r} at position {pos} (is an operator missing?)")
        return node

    def parse_or(self) -> Node:
        children = [self.parse_and()]
        while (t := self.peek()) is not None and t[1] == "|":
            self.take()
            children.append(self.parse_and())
        return children[0] if len(children) == 1 else Or(tuple(children))

    def parse_and(self) -> Node:
        children = [self.parse_not()]
        while (t := self.peek()) is not None and t[1] in "&+-":
            op = self.take()[1]
            child = self.parse_not()
            children.append(Not(child) if op == "-" else child)
        return children[0] if len(children) == 1 else And(tuple(children))

    def parse_not(self) -> Node:
        kind, value, pos = self.take()
        if kind == "op" and value in "~!":
            return Not(self.parse_not())
        if kind == "op" and value == "(":
            node = self.parse_or()
            t = self.peek()
            if t is None or t[1] != ")":
                raise self.error(f"Missing ')' for the '(' at position {pos}")
            self.take()
            return node
        if kind == "op":
            raise self.error(f"Expected an attribute name, '~' or '(' at position {pos}, got {value!r}")
        if value not in self.names:
            close = difflib.get_close_matches(value, self.names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise TargetError(
                f"Unknown attribute {value!r} in target {self.text!r}.{hint} Known attributes: {self.names}."
            )
        return Attr(self.names.index(value), value)


def _flatten(node: Node) -> Node:
    """Merge nested ANDs / ORs and cancel double negations, so stages and literal checks see one level."""
    if isinstance(node, Attr):
        return node
    if isinstance(node, Not):
        child = _flatten(node.child)
        return child.child if isinstance(child, Not) else Not(child)
    kind = type(node)
    children = []
    for c in map(_flatten, node.children):
        children.extend(c.children if isinstance(c, kind) else (c,))
    return kind(tuple(children))


def parse_target(text: str, attribute_names: Sequence[str]) -> Target:
    """Parse a target expression against a list of attribute names.

    Args:
        text (`str`): e.g. ``"a & ~b"``, ``"a | b"``, ``"a & (b | c) & ~d"``, ``"a+b-c"``.
        attribute_names (`Sequence[str]`): the attributes the heads know, in the heads' order.

    Returns:
        [`Target`].

    Raises:
        TargetError: for an unknown attribute (with the closest known name), an empty or malformed expression,
            an attribute both required and forbidden (``a & ~a``), or a target no image can satisfy (every
            image in the data holds at least one attribute, so ``~a & ~b`` over attributes ``a, b`` never holds).

    Examples:
        ```py
        >>> from s2m_diffusers.targets import parse_target
        >>> t = parse_target("A+B-C", ["A", "B", "C"])
        >>> str(t), t.present, t.absent
        ('A & B & ~C', ['A', 'B'], ['C'])
        ```
    """
    if not isinstance(text, str):
        raise TargetError(f"A target must be a string such as 'a & ~b', got {type(text).__name__}.")
    names = list(attribute_names)
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise TargetError(f"Duplicate attribute names {dupes}: every attribute needs its own name.")
    expression = _flatten(_Parser(text, names).parse())
    target = Target(expression, tuple(names), text)

    if isinstance(expression, And):
        present, absent = set(), set()
        for c in expression.children:
            if isinstance(c, Attr):
                present.add(c.name)
            elif isinstance(c, Not) and isinstance(c.child, Attr):
                absent.add(c.child.name)
        both = sorted(present & absent)
        if both:
            raise TargetError(
                f"Target {text!r} both requires and forbids {both}: no image can satisfy it. "
                f"Remove either the attribute or its negation."
            )
    if len(names) <= _MAX_SATISFIABILITY_CHECK:
        subsets = (
            frozenset(s) for k in range(1, len(names) + 1) for s in itertools.combinations(range(len(names)), k)
        )
        if not any(_holds(expression, s) for s in subsets):
            raise TargetError(
                f"Target {text!r} can never hold: no non-empty set of the attributes {names} satisfies it "
                f"(every image in the data holds at least one attribute, spec §1)."
            )
    return target


# ----------------------------------------------------------------------------------------------------------
# Log density ratio


# Relative differences below this count as zero: ``g_a - g_b`` for two attributes an image holds both of is
# exactly 0 in theory and a rounding error in floating point, which must not put the image on target.
_RELATIVE_TOLERANCE = 1e-6


def _log_sub(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """``log((a - b)^+)`` from ``log a`` and ``log b``: ``-inf`` where ``b >= a (1 - 1e-6)``, stable, warning-free."""
    diff = log_b - log_a  # <= 0 where a > b
    positive = diff < math.log1p(-_RELATIVE_TOLERANCE)
    safe = torch.where(positive, diff, torch.full_like(diff, -1.0))
    # log(1 - e^d): log(-expm1(d)) near 0, log1p(-exp(d)) far below (Maechler's log1mexp).
    log1mexp = torch.where(safe > -math.log(2), torch.log(-torch.expm1(safe)), torch.log1p(-torch.exp(safe)))
    out = log_a + log1mexp
    neg_inf = torch.full_like(out, -math.inf)
    return torch.where(positive & torch.isfinite(log_a), out, neg_inf)


def log_g(
    dr_log_probs: torch.Tensor,
    log_p_data: torch.Tensor,
    log_priors: torch.Tensor | None = None,
) -> torch.Tensor:
    """``log g_c(x) = log pi_c - log p_data(c) + log D_r(c|x)`` (spec §3).

    Args:
        dr_log_probs (`torch.Tensor` of shape `(B, n)`): ``log D_r(c|x)``.
        log_p_data (`torch.Tensor` of shape `(n,)`): log share of single-positive labels per attribute.
        log_priors (`torch.Tensor` of shape `(n,)`, *optional*): ``log pi_c``. ``None`` uses ``log p_data``
            (all ``gamma_c = 1``), which is exact for conjunction targets (spec §3).
    """
    if log_priors is None:
        return dr_log_probs
    return dr_log_probs + (log_priors - log_p_data).to(dr_log_probs)


def _eval(
    node: Node, lg: torch.Tensor, log_h: torch.Tensor, log_margin: float, log_presence: float, positive: bool = True
) -> torch.Tensor:
    if isinstance(node, Attr):
        value = lg[:, node.index]
        if positive and log_presence > -math.inf:  # a required attribute must come within kappa of the strongest
            value = torch.where(value >= log_h + log_presence, value, torch.full_like(value, -math.inf))
        return value
    if isinstance(node, Or):
        return torch.stack([_eval(c, lg, log_h, log_margin, log_presence, positive) for c in node.children]).amax(0)
    if isinstance(node, Not):
        return _log_sub(log_h, _eval(node.child, lg, log_h, log_margin, log_presence, not positive) + log_margin)
    positive_children = [c for c in node.children if not isinstance(c, Not)]
    negative = [c.child for c in node.children if isinstance(c, Not)]
    if positive_children:
        log_min = torch.stack([_eval(c, lg, log_h, log_margin, log_presence, positive) for c in positive_children])
        log_min = log_min.amin(0)
    else:
        log_min = log_h
    if not negative:
        return log_min
    log_max = torch.stack([_eval(c, lg, log_h, log_margin, log_presence, not positive) for c in negative]).amax(0)
    return _log_sub(log_min, log_max + log_margin)


def log_r(
    target: Target,
    dr_log_probs: torch.Tensor,
    log_p_data: torch.Tensor,
    log_priors: torch.Tensor | None = None,
    negation_margin: float = 1.0,
    presence_margin: float = 0.0,
) -> torch.Tensor:
    """``log r_T(x)``: the log ratio of the target density to ``p_data``, up to the constant ``pi_T`` (spec §3).

    Args:
        target ([`Target`]): from [`parse_target`].
        dr_log_probs (`torch.Tensor` of shape `(B, n)`): ``log D_r(c|x)`` over the target's attributes.
        log_p_data (`torch.Tensor` of shape `(n,)`): log share of single-positive labels per attribute.
        log_priors (`torch.Tensor` of shape `(n,)`, *optional*): log attribute priors ``pi_c`` (any scale).
        negation_margin (`float`, defaults to 1.0): ``lambda >= 1``; how much a forbidden attribute's ratio
            is scaled before it is subtracted. 1 is the paper's formula.
        presence_margin (`float`, defaults to 0.0): ``kappa`` in [0, 1]; a required attribute counts only where
            ``g_c >= kappa * h`` (``h = max_c g_c``), elsewhere it is 0. With exact heads ``g_c`` is ``h`` or 0, so
            any ``kappa <= 1`` leaves the target unchanged (0 is the paper's formula); with soft heads it keeps out
            images that hold a required attribute only faintly, the counterpart of the negation margin for present
            attributes. On Digits-7to3 (shipped GAN and heads), ``a & b & c`` held 55% of the heads' target mass on
            images missing an attribute at ``kappa = 0`` and 12% at ``kappa = 0.5``.

    Returns:
        `torch.Tensor` of shape `(B,)`: ``log r_T``, ``-inf`` where ``r_T = 0``.
    """
    if dr_log_probs.ndim != 2 or dr_log_probs.shape[1] != len(target.attribute_names):
        raise ValueError(
            f"dr_log_probs must have shape (batch, {len(target.attribute_names)}) for attributes "
            f"{list(target.attribute_names)}, got {tuple(dr_log_probs.shape)}."
        )
    if not negation_margin >= 1.0:
        raise ValueError(f"negation_margin must be >= 1 (1 is the paper's formula), got {negation_margin}.")
    if not 0.0 <= presence_margin <= 1.0:
        raise ValueError(f"presence_margin must lie in [0, 1] (0 is the paper's formula), got {presence_margin}.")
    lg = log_g(dr_log_probs, log_p_data.to(dr_log_probs), None if log_priors is None else log_priors.to(dr_log_probs))
    log_h = lg.amax(1)
    log_presence = math.log(presence_margin) if presence_margin > 0 else -math.inf
    return _eval(target.expression, lg, log_h, math.log(negation_margin), log_presence)


def log_w(
    log_r_t: torch.Tensor,
    dv_logit: torch.Tensor,
    df_log_prob: torch.Tensor | None = None,
    log_pg_class: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """The log importance weight ``log w = log p_T / p_G`` up to a constant (spec §4).

    ``log w = log r_T + logit D_v`` for an unconditional proposal; for a proposal conditioned on class ``c``,
    ``- log D_f(c|x) + log p_G(c)`` is added (the proposal's density is ``p_G(x|c)``, not ``p_G(x)``).

    Args:
        log_r_t (`torch.Tensor` of shape `(B,)`): from [`log_r`].
        dv_logit (`torch.Tensor` of shape `(B,)`): ``logit D_v(x) = log p_data(x) / p_G(x)``.
        df_log_prob (`torch.Tensor` of shape `(B,)`, *optional*): ``log D_f(c|x)`` for each sample's class.
        log_pg_class (`torch.Tensor` or `float`, *optional*): ``log p_G(c)`` for each sample's class.
    """
    out = log_r_t + dv_logit
    if df_log_prob is not None:
        if log_pg_class is None:
            raise ValueError("A class-conditional proposal needs log_pg_class (log p_G(c)) beside df_log_prob.")
        out = out - df_log_prob + log_pg_class
    return out


def temper_dr(dr_log_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log softmax(log D_r / T)``: ``D_r`` sharpened (``T < 1``) or flattened (``T > 1``).

    With exact heads and labels drawn uniformly among an image's attributes, ``D_r(.|x)`` is uniform on the image's
    attribute set ``S(x)`` and zero elsewhere, and tempering leaves it unchanged: the target ``p_T`` is the same
    for every ``T``. With soft heads it is not: ``T < 1`` pushes the small probabilities of absent attributes
    towards zero (a conjunction ``a & b & c`` is then held only by images whose ``D_r`` is close to uniform over
    all three), while ``T > 1`` lifts them (a negation ``~c`` is then stricter). The official S2M scripts temper
    by the number of present attributes (1.2 for one, 1.0 for two, 0.2 for three); see `auto_dr_temperature`.

    Args:
        dr_log_probs (`torch.Tensor` of shape `(B, n)`): ``log D_r(c|x)``.
        temperature (`float`): ``T > 0``; 1 returns the input.

    Returns:
        `torch.Tensor` of shape `(B, n)`: the tempered log probabilities.
    """
    if not temperature > 0 or not math.isfinite(temperature):
        raise ValueError(f"The D_r temperature must be a positive number, got {temperature}; 1.0 leaves D_r as is.")
    if temperature == 1.0:
        return dr_log_probs
    return torch.log_softmax(dr_log_probs / temperature, dim=-1)


def auto_dr_temperature(target: Target, sharp: float = 0.2) -> float:
    """The ``D_r`` temperature of ``dr_temperature="auto"``: ``sharp`` for a conjunction of two or more attributes
    with no negation (``a & b & c``), 1.0 otherwise.

    Tempering is exact for exact heads (`temper_dr`), so this only changes how soft heads are read: a pure
    conjunction asks that ``D_r`` spread its mass evenly over the required attributes, and soft heads leave too much
    on images that hold only some of them (on Digits-7to3, ``a & b & c`` drew 45% images missing an attribute at
    ``T = 1`` and 12% at ``T = 0.2``, the official scripts' value for three attributes). A target with a negation
    keeps ``T = 1``: sharpening hides the minor attribute that the negation must see.

    Args:
        target ([`Target`]): a parsed target.
        sharp (`float`, defaults to 0.2): the temperature of pure conjunctions.

    Returns:
        `float`: the temperature.
    """
    if target.is_conjunction and not target.absent and len(target.present) >= 2:
        return float(sharp)
    return 1.0
