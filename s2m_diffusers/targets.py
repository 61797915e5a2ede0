"""Targets: boolean formulas over attributes (spec §3), parsed into a [`Target`].

A target is written against the attribute names of the heads, e.g. ``"black_hair & male & ~smiling"``,
``"a & (b | c) & ~d"``, or in the paper's form ``"a+b-c"`` (``+`` is AND, a binary ``-`` is AND NOT).
Operators: ``&`` AND, ``|`` OR, ``~`` or ``!`` NOT, parentheses. Precedence, from tightest: NOT, AND
(``&``, ``+``, binary ``-``), OR.

A [`Target`] knows what it says about attribute sets (``holds``, ``holds_batch``), its refinements one literal at a
time (``stages``, which a budget error reports on) and the attribute a class-conditional proposal is given
(``first_present``). Its density ratio to
``p_data``, ``log r_T``, is [`s2m_diffusers.maths.log_r`].
"""

from __future__ import annotations

import difflib
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
    "parse_target_for_heads",
    "check_attribute_names",
]

_MAX_SATISFIABILITY_CHECK = 16  # attributes up to which "can this target ever hold" is checked exhaustively
MAX_NESTING = 50  # parentheses and negations inside one another; real targets need a handful


class TargetError(ValueError):
    """A target expression that cannot be parsed or can never hold.

    ``unknown_attribute`` is the name that is not among the attributes when that is the problem, else `None`.
    """

    def __init__(self, message: str, unknown_attribute: str | None = None):
        super().__init__(message)
        self.unknown_attribute = unknown_attribute


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
    def first_present(self) -> int | None:
        """Index of the first attribute the target requires at its top level, in the order written (the attribute
        of ``stages()[0]``), or `None` (``"a | b"``, ``"~a"``): the class a class-conditional proposal is given."""
        children = self.expression.children if isinstance(self.expression, And) else (self.expression,)
        return next((c.index for c in children if isinstance(c, Attr)), None)

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
        """The target one more literal of its top-level AND at a time (what a budget error reports the entry pool's
        shares on, `weights.Weigher.pool_report`).

        ``a & b & ~c`` gives ``a``, ``a & b``, ``a & b & ~c``: present literals first, in the order written,
        then negated ones, then any other conjunct. A target that is not an AND is a single stage. There are never
        more stages than distinct attributes in the target: beyond that, the remaining conjuncts join the last stage.
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
        limit = max(1, len(_attribute_indices(self.expression)))
        return stages if len(stages) <= limit else [*stages[: limit - 1], stages[-1]]


# ----------------------------------------------------------------------------------------------------------
# Parsing


def _quoted(text: str, limit: int = 120) -> str:
    """``repr(text)``, shortened to its first `limit` characters for a long target."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


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
                f"{_quoted(text)}. Use attribute names with `&` (and), `|` (or), `~` (not) and parentheses, e.g. "
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
        self.depth = 0  # parentheses and negations open at the current token

    def error(self, message: str, fix: str = "") -> TargetError:
        return TargetError(f"{message} in target {_quoted(self.text)}." + (f" {fix}" if fix else ""))

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
        if kind == "op" and value in "~!(":
            self.depth += 1
            if self.depth > MAX_NESTING:
                raise self.error(
                    f"More than {MAX_NESTING} parentheses and negations are open inside one another at position {pos}",
                    "Write the target with fewer levels: `~~a` is `a`, `((a))` is `a`.",
                )
            node = Not(self.parse_not()) if value in "~!" else self.parse_or()
            if value == "(":
                t = self.peek()
                if t is None or t[1] != ")":
                    raise self.error(f"Missing ')' for the '(' at position {pos}")
                self.take()
            self.depth -= 1
            return node
        if kind == "op":
            raise self.error(f"Expected an attribute name, '~' or '(' at position {pos}, got {value!r}")
        if value not in self.names:
            same = [n for n in self.names if n.lower() == value.lower()]
            close = same or difflib.get_close_matches(value, self.names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            hint += " Attribute names are case-sensitive." if same else ""
            raise TargetError(
                f"Unknown attribute {value!r} in target {_quoted(self.text)}.{hint} Known attributes: {self.names}.",
                unknown_attribute=value,
            )
        return Attr(self.names.index(value), value)


def _flatten(node: Node) -> Node:
    """Merge nested ANDs / ORs, cancel double negations and drop repeated conjuncts / disjuncts (``a & a`` is
    ``a``), so stages and literal checks see one level."""
    if isinstance(node, Attr):
        return node
    if isinstance(node, Not):
        child = _flatten(node.child)
        return child.child if isinstance(child, Not) else Not(child)
    kind = type(node)
    children = []
    for c in map(_flatten, node.children):
        children.extend(c.children if isinstance(c, kind) else (c,))
    children = list(dict.fromkeys(children))  # the first of each repeated child, in the order written
    return children[0] if len(children) == 1 else kind(tuple(children))


def _attribute_indices(node: Node) -> set[int]:
    """The attributes an expression names."""
    out, todo = set(), [node]
    while todo:
        n = todo.pop()
        if isinstance(n, Attr):
            out.add(n.index)
        elif isinstance(n, Not):
            todo.append(n.child)
        else:
            todo.extend(n.children)
    return out


def parse_target_for_heads(target: str | Target | None, names: Sequence[str], default: str | None = None) -> Target:
    """``target`` (or ``default``, a pipeline's ``default_target``) parsed against the heads' attribute ``names``; an
    unknown attribute's error says that the heads were not trained on it."""
    names = list(names)
    if target is None:
        target = default
    if target is None:
        raise ValueError(
            f"Name a target over the heads' attributes {names}, e.g. pipe('{names[0]} & ~{names[-1]}'); from "
            f'`diffusers-cli run`, pass --pipeline-kwargs \'{{"target": "{names[0]} & ~{names[-1]}"}}\'. '
            "A pipeline saved with `default_target=` uses that one."
        )
    if isinstance(target, Target):
        if list(target.attribute_names) != names:
            raise TargetError(
                f"The target was parsed against attributes {list(target.attribute_names)}, but the heads know "
                f"{names}. Pass the target as a string to parse it against the heads' attributes."
            )
        return target
    try:
        return parse_target(target, names)
    except TargetError as err:
        if getattr(err, "unknown_attribute", None) is None:
            raise
        raise TargetError(
            f"{err} These are the attributes this pipeline's heads were trained on; to target another attribute, "
            "train heads on single-positive data that includes it.",
            unknown_attribute=err.unknown_attribute,
        ) from err


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
                f"Target {_quoted(text)} both requires and forbids {both}: no image can satisfy it. "
                f"Remove either the attribute or its negation."
            )
    if len(names) <= _MAX_SATISFIABILITY_CHECK:
        # every non-empty attribute set at once, (2^n - 1, n): bit i of row r + 1 says whether attribute i is held
        rows = torch.arange(1, 2 ** len(names))
        subsets = (rows[:, None] >> torch.arange(len(names))) & 1
        if not bool(_holds_batch(expression, subsets.bool()).any()):
            raise TargetError(
                f"Target {_quoted(text)} can never hold: no non-empty set of the attributes {names} satisfies it "
                f"(every image in the data holds at least one attribute, spec §1)."
            )
    return target


_ATTRIBUTE_NAME = re.compile(r"[A-Za-z0-9_.]+")


def check_attribute_names(names: list[str]) -> None:
    """Refuse attribute lists the target syntax cannot name: fewer than 2, names outside [A-Za-z0-9_.]+, duplicates."""
    if len(names) < 2:
        raise ValueError(
            f"S2M needs at least 2 attributes, got {names}. With one attribute there is nothing to combine: "
            "use the proposal alone, or add single-positive data for more attributes."
        )
    for name in names:
        if not isinstance(name, str) or not _ATTRIBUTE_NAME.fullmatch(name):
            raise ValueError(
                f"Attribute name {name!r} is not allowed: names must match [A-Za-z0-9_.]+ (no spaces or "
                "`&|~!()+-`, which the target syntax uses). Rename it, e.g. 'black_hair'."
            )
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"Duplicate attribute names {duplicates} in {names}; each attribute needs one name.")
