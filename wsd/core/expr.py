"""The filter expression language of routing rules: checked once, then evaluated as closures.

Owns ``ExpressionError``, ``Expression`` and ``compile_expression``. The source is parsed with
``ast.parse(mode="eval")`` only to get a syntax tree; every node is checked against a whitelist and
turned into a nested Python closure. Nothing is handed to ``eval``/``exec`` or compiled into a code
object, and no Python attribute is ever read: ``msg.x`` reads the key ``"x"`` of a mapping. So an
expression can look at the message and the connection and do nothing else.

The language (what ``routing.rules[].filter.expression`` accepts):

* literals: strings, ints, floats, ``true``/``True``, ``false``/``False``, ``null``/``None``,
  lists ``[..]`` and tuples ``(..)``;
* names: ``msg`` (alias ``message``) and ``conn`` (alias ``connection``); ``a.b`` and ``a["b"]`` read
  a mapping key, ``a[0]`` a list item (negative indices count from the end). A missing key or index,
  or a lookup on something that is not a mapping or a sequence, gives ``null`` instead of failing;
* ``== != < <= > >=`` (chainable), ``in``, ``not in``: a comparison between incompatible types (for
  example ``null < 3`` or ``1 in "abc"``) is false instead of an error;
* ``and``, ``or``, ``not``; ``+ - * / %`` and unary ``-``. ``*`` and ``%`` take numbers only (no
  string repetition or formatting);
* functions: ``len(x)`` (``null`` if x has no length), ``lower(s)``, ``upper(s)`` (``null`` unless s
  is a string), ``startswith(s, prefix)``, ``endswith(s, suffix)`` (prefix may be a list of
  strings), ``contains(s_or_list, x)``, ``matches(s, "regex")`` (Python ``re.search``; the pattern
  must be a string literal and is compiled once), ``has(x)`` (x is not null), ``any_of(list, list)``
  (some item of the first is in the second). The predicates are false for arguments of the wrong
  type.

Any other evaluation error (division by zero, ``"a" + 1``, ...) makes the whole expression false.
Error positions are 1-based character offsets into the source, which is the column for the usual
one-line expression.

Pure: no asyncio, sockets, time or logging.
"""

from __future__ import annotations

import ast
import operator
import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

__all__ = ["MAX_DEPTH", "MAX_SOURCE_CHARS", "Expression", "ExpressionError", "compile_expression"]

MAX_SOURCE_CHARS = 2000
MAX_DEPTH = 50

# An evaluator takes (msg, conn) and returns a value.
_Eval = Callable[[Any, Any], Any]

_NUMBERS = (int, float)  # bool is an int
_SEQUENCES = (list, tuple, str)


class ExpressionError(ValueError):
    """A compile-time problem with an expression, at a 1-based ``position`` in the source."""

    __slots__ = ("message", "position")

    def __init__(self, message: str, position: int) -> None:
        self.message = message
        self.position = position
        super().__init__(f"col {position}: {message}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message, self.position))


class Expression:
    """A compiled expression; call it with the message and connection mappings to get a bool."""

    __slots__ = ("_fn", "reads_data", "source", "uses_conn", "uses_msg")

    def __init__(self, source: str, fn: _Eval, uses_msg: bool, uses_conn: bool, reads_data: bool = False) -> None:
        self.source = source
        self.uses_msg = uses_msg
        self.uses_conn = uses_conn
        #: whether it may read the message's ``data``: ``msg.data`` (or ``msg["data"]``) anywhere, or ``msg``
        #: used other than through a literal key (an encrypted channel group refuses such a rule)
        self.reads_data = reads_data
        self._fn = fn

    def __call__(self, msg: Mapping[str, Any] | None, conn: Mapping[str, Any] | None) -> bool:
        try:
            return bool(self._fn(msg, conn))
        except Exception:  # the contract: an expression that fails to evaluate is false
            return False

    def __repr__(self) -> str:
        return f"Expression({self.source!r})"


def compile_expression(src: str) -> Expression:
    """Parse, check and compile ``src``; raise ``ExpressionError`` (with a position) if it is not valid."""
    if not isinstance(src, str):
        raise ExpressionError(f"expression must be a string, got {type(src).__name__}", 1)
    if len(src) > MAX_SOURCE_CHARS:
        raise ExpressionError(f"expression is longer than {MAX_SOURCE_CHARS} characters",
                              MAX_SOURCE_CHARS + 1)
    nul = src.find("\x00")
    if nul >= 0:
        raise ExpressionError("expression contains a NUL character", nul + 1)
    body = src.lstrip()
    if not body:
        raise ExpressionError("empty expression", 1)
    source = _Source(body, len(src) - len(body))
    tree = _parse(source)
    _check_depth(tree, source)
    compiler = _Compiler(source)
    fn = compiler.compile(tree.body)
    return Expression(src, fn, compiler.uses_msg, compiler.uses_conn, compiler.reads_data)


# --------------------------------------------------------------------------- positions and parsing


_LINE_END = re.compile(r"\r\n|\r|\n")


class _Source:
    """The (left-stripped) source text, and conversion of AST line/byte offsets to positions."""

    __slots__ = ("lines", "prefix", "starts", "text")

    def __init__(self, text: str, prefix: int) -> None:
        self.text = text
        self.prefix = prefix
        # Python's tokenizer treats \r\n, \r and \n as line ends; str.splitlines knows more.
        self.lines = _LINE_END.split(text)
        self.starts = [0] + [m.end() for m in _LINE_END.finditer(text)]

    def index(self, lineno: int, byte_col: int) -> int:
        """0-based character index in the stripped text of (1-based line, UTF-8 byte column)."""
        lineno = max(1, min(lineno, len(self.lines)))
        line = self.lines[lineno - 1]
        chars = len(line.encode("utf-8")[:byte_col].decode("utf-8", errors="ignore"))
        return self.starts[min(lineno - 1, len(self.starts) - 1)] + chars

    def position(self, lineno: int, byte_col: int) -> int:
        """1-based position in the original source."""
        return self.prefix + self.index(lineno, byte_col) + 1

    def node_position(self, node: ast.AST) -> int:
        return self.position(node.lineno, node.col_offset)  # type: ignore[attr-defined]

    def node_end(self, node: ast.AST) -> int:
        """0-based character index (stripped text) just past the node."""
        return self.index(node.end_lineno, node.end_col_offset)  # type: ignore[attr-defined]

    def operator_position(self, left: ast.AST, right: ast.AST) -> int:
        """Position of the operator token between two operands (skipping blanks and parentheses)."""
        start = self.node_end(left)
        stop = self.index(right.lineno, right.col_offset)  # type: ignore[attr-defined]
        i = start
        while i < stop and (self.text[i].isspace() or self.text[i] == ")"):
            i += 1
        return self.prefix + i + 1


def _parse(source: _Source) -> ast.Expression:
    try:
        with warnings.catch_warnings():
            # invalid escape sequences in regex literals ("\d") only warn; they are not our business
            warnings.simplefilter("ignore")
            # The trailing newline makes errors at the end ("msg.type ==") carry a real offset.
            tree = ast.parse(source.text + "\n", mode="eval")
    except SyntaxError as e:
        lineno = e.lineno or 1
        if e.offset and e.offset > 0:
            idx = source.starts[min(lineno, len(source.starts)) - 1] + e.offset - 1
            position = source.prefix + min(idx, len(source.text)) + 1
        else:
            position = source.prefix + len(source.text) + 1
        raise ExpressionError(f"syntax error: {e.msg}", position) from None
    except (RecursionError, MemoryError):
        raise ExpressionError("expression is too complex", 1) from None
    except ValueError as e:  # defensive: the parser rejects some inputs with ValueError
        raise ExpressionError(f"syntax error: {e}", 1) from None
    return tree


# Nodes without a position of their own that do not add nesting.
_UNPOSITIONED = (ast.expr_context, ast.operator, ast.unaryop, ast.cmpop, ast.boolop)


def _check_depth(tree: ast.Expression, source: _Source) -> None:
    """Refuse trees deeper than MAX_DEPTH, iteratively (the compiler after it recurses)."""
    stack: list[tuple[ast.AST, int, ast.AST]] = [(tree.body, 1, tree.body)]
    while stack:
        node, depth, located = stack.pop()
        if hasattr(node, "col_offset"):
            located = node
        if depth > MAX_DEPTH:
            raise ExpressionError(
                f"expression is nested more than {MAX_DEPTH} levels deep", source.node_position(located)
            )
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, _UNPOSITIONED):
                stack.append((child, depth + 1, located))


# --------------------------------------------------------------------------- runtime helpers


def _get(obj: Any, key: Any) -> Any:
    """``obj[key]`` for mappings and sequences; None when absent or not indexable."""
    if type(obj) is dict:
        try:
            return obj.get(key)
        except TypeError:  # unhashable key
            return None
    if isinstance(obj, _SEQUENCES):
        if type(key) is int:
            try:
                return obj[key]
            except IndexError:
                return None
        return None
    if isinstance(obj, Mapping):
        try:
            return obj.get(key)
        except TypeError:
            return None
    return None


def _is_in(item: Any, container: Any) -> bool:
    try:
        return item in container
    except TypeError:
        return False


def _not_in(item: Any, container: Any) -> bool:
    # false for incompatible types, like every failed comparison: a filter fails closed
    try:
        return item not in container
    except TypeError:
        return False


def _mul(a: Any, b: Any) -> Any:
    if isinstance(a, _NUMBERS) and isinstance(b, _NUMBERS):
        return a * b
    raise TypeError("'*' takes numbers")


def _mod(a: Any, b: Any) -> Any:
    if isinstance(a, _NUMBERS) and isinstance(b, _NUMBERS):
        return a % b
    raise TypeError("'%' takes numbers")


def _neg(a: Any) -> Any:
    if isinstance(a, _NUMBERS):
        return -a
    raise TypeError("unary '-' takes a number")


# Ordering between incompatible types (null < 3) is false rather than an error.
def _lt(a: Any, b: Any) -> bool:
    try:
        return a < b  # type: ignore[no-any-return]
    except TypeError:
        return False


def _le(a: Any, b: Any) -> bool:
    try:
        return a <= b  # type: ignore[no-any-return]
    except TypeError:
        return False


def _gt(a: Any, b: Any) -> bool:
    try:
        return a > b  # type: ignore[no-any-return]
    except TypeError:
        return False


def _ge(a: Any, b: Any) -> bool:
    try:
        return a >= b  # type: ignore[no-any-return]
    except TypeError:
        return False


_COMPARE: dict[type[ast.cmpop], Callable[[Any, Any], Any]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: _lt,
    ast.LtE: _le,
    ast.Gt: _gt,
    ast.GtE: _ge,
    ast.In: _is_in,
    ast.NotIn: _not_in,
}

_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: _mul,
    ast.Div: operator.truediv,
    ast.Mod: _mod,
}

_OPERATOR_SYMBOLS = {
    ast.Pow: "**", ast.FloorDiv: "//", ast.MatMult: "@", ast.BitAnd: "&", ast.BitOr: "|",
    ast.BitXor: "^", ast.LShift: "<<", ast.RShift: ">>", ast.Is: "is", ast.IsNot: "is not",
    ast.Invert: "~", ast.UAdd: "unary +",
}


def _fn_len(x: Any) -> int | None:
    return len(x) if isinstance(x, (str, list, tuple, Mapping)) else None


def _fn_lower(s: Any) -> str | None:
    return s.lower() if isinstance(s, str) else None


def _fn_upper(s: Any) -> str | None:
    return s.upper() if isinstance(s, str) else None


def _affix(x: Any) -> str | tuple[str, ...] | None:
    if isinstance(x, str):
        return x
    if isinstance(x, (list, tuple)) and all(isinstance(i, str) for i in x):
        return tuple(x)
    return None


def _fn_startswith(s: Any, prefix: Any) -> bool:
    p = _affix(prefix)
    return isinstance(s, str) and p is not None and s.startswith(p)


def _fn_endswith(s: Any, suffix: Any) -> bool:
    p = _affix(suffix)
    return isinstance(s, str) and p is not None and s.endswith(p)


def _fn_contains(container: Any, item: Any) -> bool:
    return container is not None and _is_in(item, container)


def _fn_has(x: Any) -> bool:
    return x is not None


def _fn_any_of(items: Any, pool: Any) -> bool:
    if not isinstance(items, (list, tuple)) or not isinstance(pool, (list, tuple, frozenset)):
        return False
    return any(_is_in(i, pool) for i in items)


# name -> (implementation, arity); matches() is compiled specially (literal pattern).
_FUNCTIONS: dict[str, tuple[Callable[..., Any], int]] = {
    "len": (_fn_len, 1),
    "lower": (_fn_lower, 1),
    "upper": (_fn_upper, 1),
    "startswith": (_fn_startswith, 2),
    "endswith": (_fn_endswith, 2),
    "contains": (_fn_contains, 2),
    "has": (_fn_has, 1),
    "any_of": (_fn_any_of, 2),
    "matches": (re.search, 2),
}
_FUNCTION_LIST = ", ".join(sorted(_FUNCTIONS))

_CONSTANT_NAMES = {"true": True, "false": False, "null": None}
_MSG_NAMES = frozenset({"msg", "message"})
_CONN_NAMES = frozenset({"conn", "connection"})

_FORBIDDEN = {
    ast.Lambda: "lambda is not allowed",
    ast.ListComp: "comprehensions are not allowed",
    ast.SetComp: "comprehensions are not allowed",
    ast.DictComp: "comprehensions are not allowed",
    ast.GeneratorExp: "generator expressions are not allowed",
    ast.NamedExpr: "assignment expressions (:=) are not allowed",
    ast.JoinedStr: "f-strings are not allowed",
    ast.FormattedValue: "f-strings are not allowed",
    ast.Starred: "star-expressions are not allowed",
    ast.IfExp: "conditional expressions (x if c else y) are not supported",
    ast.Dict: "dict literals are not supported",
    ast.Set: "set literals are not supported",
    ast.Slice: "slices are not supported",
    ast.Await: "await is not allowed",
    ast.Yield: "yield is not allowed",
    ast.YieldFrom: "yield is not allowed",
}


def _const(value: Any) -> _Eval:
    return lambda m, c: value


# --------------------------------------------------------------------------- the compiler


class _Compiler:
    """Turns a checked AST into closures, recording whether ``msg`` / ``conn`` are used."""

    __slots__ = ("_keyed", "reads_data", "source", "uses_conn", "uses_msg")

    def __init__(self, source: _Source) -> None:
        self.source = source
        self.uses_msg = False
        self.uses_conn = False
        self.reads_data = False
        self._keyed = False  # the next msg name is the root of a literal key path (which says what it reads)

    def fail(self, message: str, node: ast.AST) -> NoReturn:
        raise ExpressionError(message, self.source.node_position(node))

    # A literal is a constant, true/false/null, a negated number, or a list/tuple of literals.
    def literal(self, node: ast.AST) -> tuple[bool, Any]:
        if isinstance(node, ast.Constant):
            if node.value is None or type(node.value) in (str, int, float, bool):
                return True, node.value
            return False, None
        if isinstance(node, ast.Name) and node.id in _CONSTANT_NAMES:
            return True, _CONSTANT_NAMES[node.id]
        if (isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub)
                and isinstance(node.operand, ast.Constant) and type(node.operand.value) in (int, float)):
            return True, -node.operand.value
        if isinstance(node, (ast.List, ast.Tuple)):
            values = []
            for elt in node.elts:
                ok, value = self.literal(elt)
                if not ok:
                    return False, None
                values.append(value)
            return True, (values if isinstance(node, ast.List) else tuple(values))
        return False, None

    def compile(self, node: ast.AST) -> _Eval:
        forbidden = _FORBIDDEN.get(type(node))
        if forbidden:
            self.fail(forbidden, node)
        handler = _HANDLERS.get(type(node))
        if handler is None:
            self.fail(f"{type(node).__name__} is not supported", node)
        return handler(self, node)

    def c_Constant(self, node: ast.Constant) -> _Eval:
        ok, value = self.literal(node)
        if not ok:
            self.fail(f"{type(node.value).__name__} literals are not supported", node)
        return _const(value)

    def c_Name(self, node: ast.Name) -> _Eval:
        name = node.id
        if name in _CONSTANT_NAMES:
            return _const(_CONSTANT_NAMES[name])
        if name in _MSG_NAMES:
            self.uses_msg = True
            if not self._keyed:
                self.reads_data = True  # msg as a whole (or by a computed key): it may read data
            self._keyed = False
            return lambda m, c: m
        if name in _CONN_NAMES:
            self.uses_conn = True
            return lambda m, c: c
        if name in _FUNCTIONS:
            self.fail(f"function {name!r} must be called", node)
        self.fail(f"unknown name {name!r} (use msg or conn)", node)

    def _seq(self, node: ast.List | ast.Tuple, make: Callable[[list[Any]], Any]) -> _Eval:
        ok, value = self.literal(node)
        if ok:
            return _const(value)
        fns = [self.compile(e) for e in node.elts]
        return lambda m, c: make([f(m, c) for f in fns])

    def c_List(self, node: ast.List) -> _Eval:
        return self._seq(node, list)

    def c_Tuple(self, node: ast.Tuple) -> _Eval:
        return self._seq(node, tuple)

    def _key_path(self, node: ast.AST) -> tuple[ast.Name, list[Any]] | None:
        """For msg.a["b"].c: (the Name, ["a", "b", "c"]) when every key is a literal."""
        keys: list[Any] = []
        while True:
            if isinstance(node, ast.Attribute):
                keys.append(node.attr)
                node = node.value
            elif isinstance(node, ast.Subscript):
                ok, key = self.literal(node.slice)
                if not ok:
                    return None
                try:
                    hash(key)
                except TypeError:  # a list key: leave it to the generic (guarded) lookup
                    return None
                keys.append(key)
                node = node.value
            elif isinstance(node, ast.Name) and (node.id in _MSG_NAMES or node.id in _CONN_NAMES):
                keys.reverse()
                return node, keys
            else:
                return None

    def _check_attr(self, node: ast.Attribute) -> None:
        if node.attr.startswith("_"):
            pos = self.source.prefix + self.source.node_end(node) - len(node.attr) + 1
            raise ExpressionError(f"attribute names may not start with '_' ({node.attr!r})", pos)

    def _path(self, node: ast.AST) -> _Eval | None:
        found = self._key_path(node)
        if found is None:
            return None
        # validate every link (forbidden attribute names, slices) before compiling the root
        link = node
        while isinstance(link, (ast.Attribute, ast.Subscript)):
            if isinstance(link, ast.Attribute):
                self._check_attr(link)
            link = link.value
        keys = tuple(found[1])
        if found[0].id in _MSG_NAMES and keys[0] == "data":
            self.reads_data = True
        self._keyed = True
        self.compile(found[0])  # records uses_msg / uses_conn
        self._keyed = False
        on_conn = found[0].id in _CONN_NAMES
        if len(keys) == 1:
            (k,) = keys
            if on_conn:
                return lambda m, c: c.get(k) if type(c) is dict else _get(c, k)
            return lambda m, c: m.get(k) if type(m) is dict else _get(m, k)

        # keys are hashable literals, so dict.get cannot raise on them
        def walk(m: Any, c: Any) -> Any:
            obj = c if on_conn else m
            for k in keys:
                obj = obj.get(k) if type(obj) is dict else _get(obj, k)
                if obj is None:
                    return None
            return obj

        return walk

    def c_Attribute(self, node: ast.Attribute) -> _Eval:
        self._check_attr(node)
        path = self._path(node)
        if path is not None:
            return path
        base, name = self.compile(node.value), node.attr
        return lambda m, c: _get(base(m, c), name)

    def c_Subscript(self, node: ast.Subscript) -> _Eval:
        if isinstance(node.slice, ast.Slice):
            self.fail(_FORBIDDEN[ast.Slice], node.slice)
        path = self._path(node)
        if path is not None:
            return path
        base, key = self.compile(node.value), self.compile(node.slice)
        return lambda m, c: _get(base(m, c), key(m, c))

    def c_BoolOp(self, node: ast.BoolOp) -> _Eval:
        fns = [self.compile(v) for v in node.values]
        if isinstance(node.op, ast.And):
            if len(fns) == 2:
                a, b = fns
                return lambda m, c: a(m, c) and b(m, c)

            def all_of(m: Any, c: Any) -> Any:
                value: Any = True
                for f in fns:
                    value = f(m, c)
                    if not value:
                        return value
                return value

            return all_of
        if len(fns) == 2:
            a, b = fns
            return lambda m, c: a(m, c) or b(m, c)

        def first_of(m: Any, c: Any) -> Any:
            value: Any = False
            for f in fns:
                value = f(m, c)
                if value:
                    return value
            return value

        return first_of

    def c_UnaryOp(self, node: ast.UnaryOp) -> _Eval:
        if isinstance(node.op, ast.Not):
            f = self.compile(node.operand)
            return lambda m, c: not f(m, c)
        if isinstance(node.op, ast.USub):
            ok, value = self.literal(node)
            if ok:
                return _const(value)
            f = self.compile(node.operand)
            return lambda m, c: _neg(f(m, c))
        self.fail(f"operator {_OPERATOR_SYMBOLS.get(type(node.op), '?')} is not supported", node)

    def c_BinOp(self, node: ast.BinOp) -> _Eval:
        op = _BINARY.get(type(node.op))
        if op is None:
            symbol = _OPERATOR_SYMBOLS.get(type(node.op), type(node.op).__name__)
            raise ExpressionError(f"operator {symbol} is not supported",
                                  self.source.operator_position(node.left, node.right))
        a, b = self.compile(node.left), self.compile(node.right)
        return lambda m, c: op(a(m, c), b(m, c))

    def c_Compare(self, node: ast.Compare) -> _Eval:
        left_node = node.left
        ops: list[Callable[[Any, Any], bool]] = []
        for op, right_node in zip(node.ops, node.comparators, strict=True):
            fn = _COMPARE.get(type(op))
            if fn is None:
                symbol = _OPERATOR_SYMBOLS.get(type(op), type(op).__name__)
                hint = " (use == or !=)" if isinstance(op, (ast.Is, ast.IsNot)) else ""
                raise ExpressionError(f"operator {symbol!r} is not supported{hint}",
                                      self.source.operator_position(left_node, right_node))
            ops.append(fn)
            left_node = right_node
        left = self.compile(node.left)
        rights = [self._membership_operand(op, r) for op, r in zip(node.ops, node.comparators, strict=True)]
        if len(ops) == 1:
            (compare,), (right,) = ops, rights
            ok, value = self.literal(node.comparators[0])
            if ok and not isinstance(value, (list, tuple)):
                return lambda m, c: compare(left(m, c), value)
            return lambda m, c: compare(left(m, c), right(m, c))
        pairs = tuple(zip(ops, rights, strict=True))

        def chain(m: Any, c: Any) -> bool:
            a = left(m, c)
            for compare, right in pairs:
                b = right(m, c)
                if not compare(a, b):
                    return False
                a = b
            return True

        return chain

    def _membership_operand(self, op: ast.cmpop, node: ast.AST) -> _Eval:
        """A literal list/tuple on the right of in / not in becomes a frozenset when it can."""
        if isinstance(op, (ast.In, ast.NotIn)):
            ok, value = self.literal(node)
            if ok and isinstance(value, (list, tuple)):
                try:
                    return _const(_Members(value))
                except TypeError:  # an unhashable item: keep the list
                    pass
        return self.compile(node)

    def c_Call(self, node: ast.Call) -> _Eval:
        func = node.func
        if not isinstance(func, ast.Name):
            forbidden = _FORBIDDEN.get(type(func))
            if forbidden:
                self.fail(forbidden, func)
            self.fail(f"only these functions can be called: {_FUNCTION_LIST}", node)
        name = func.id
        if name not in _FUNCTIONS:
            self.fail(f"unknown function {name!r} (allowed: {_FUNCTION_LIST})", node)
        for arg in node.args:
            if isinstance(arg, ast.Starred):
                self.fail(_FORBIDDEN[ast.Starred], arg)
        if node.keywords:
            kw = node.keywords[0]
            self.fail(f"{name}() takes no keyword arguments", kw)
        impl, arity = _FUNCTIONS[name]
        if len(node.args) != arity:
            plural = "s" if arity != 1 else ""
            self.fail(f"{name}() takes {arity} argument{plural} ({len(node.args)} given)", node)
        if name == "matches":
            return self._matches(node)
        args = node.args
        if name == "any_of":
            ok, value = self.literal(args[1])
            if ok and isinstance(value, (list, tuple)):
                try:
                    pool = _Members(value)
                except TypeError:
                    pass
                else:
                    items = self.compile(args[0])
                    return lambda m, c: _fn_any_of(items(m, c), pool)
        fns = [self.compile(a) for a in args]
        if arity == 1:
            (x,) = fns
            return lambda m, c: impl(x(m, c))
        x, y = fns
        return lambda m, c: impl(x(m, c), y(m, c))

    def _matches(self, node: ast.Call) -> _Eval:
        subject_node, pattern_node = node.args
        if not (isinstance(pattern_node, ast.Constant) and isinstance(pattern_node.value, str)):
            self.fail("matches() needs a string literal as its pattern", pattern_node)
        try:
            pattern = re.compile(pattern_node.value)
        except re.error as e:
            self.fail(f"invalid regular expression: {e}", pattern_node)
        except (RecursionError, OverflowError):
            self.fail("regular expression is too complex", pattern_node)
        search = pattern.search
        subject = self.compile(subject_node)

        def matches(m: Any, c: Any) -> bool:
            s = subject(m, c)
            return isinstance(s, str) and search(s) is not None

        return matches


# The node types the language has, and the method that compiles each (an explicit table).
_HANDLERS: dict[type[ast.AST], Callable[[_Compiler, Any], _Eval]] = {
    ast.Constant: _Compiler.c_Constant,
    ast.Name: _Compiler.c_Name,
    ast.List: _Compiler.c_List,
    ast.Tuple: _Compiler.c_Tuple,
    ast.Attribute: _Compiler.c_Attribute,
    ast.Subscript: _Compiler.c_Subscript,
    ast.BoolOp: _Compiler.c_BoolOp,
    ast.UnaryOp: _Compiler.c_UnaryOp,
    ast.BinOp: _Compiler.c_BinOp,
    ast.Compare: _Compiler.c_Compare,
    ast.Call: _Compiler.c_Call,
}


class _Members(frozenset):  # type: ignore[type-arg]
    """A literal list on the right of ``in``: hashed look-up, falling back to a scan for unhashables."""

    __slots__ = ("_items",)

    def __new__(cls, items: list[Any] | tuple[Any, ...]) -> _Members:
        self = super().__new__(cls, items)
        self._items = tuple(items)
        return self

    def __contains__(self, item: object) -> bool:
        try:
            return frozenset.__contains__(self, item)
        except TypeError:
            return item in self._items
