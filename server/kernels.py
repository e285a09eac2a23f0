"""The update-math DSL: every optimizer's elementwise math is written once.

An ``UpdateKernel`` is a tiny program in Python syntax::

    ADAM = UpdateKernel(
        name="adam",
        inputs=("grad",),
        state=("var", "m", "v"),
        scalars=("alpha", "beta_1", "beta_2", "epsilon"),
        body='''
    m = m + (grad - m) * (1 - beta_1)
    v = v + (square(grad) - v) * (1 - beta_2)
    var = var - (m * alpha) / (sqrt(v) + epsilon)
    ''',
    )

It is compiled, at construction, into two equivalent implementations:

* a NumPy program: ufunc calls with ``out=`` into block-sized scratch buffers, run
  by ``optserve.server.backends.NumpyBackend`` over cache-sized blocks;
* the source of one fused CuPy ``ElementwiseKernel`` (``cuda_source()``), built by
  ``optserve.server.cupy_backend`` on first use. Generating it never imports CuPy.

The same element code (``c_operation()``) is also compiled for the host CPU by
``optserve.server.native_kernels``, where every operation is exactly rounded.

Semantics: statements run in order, elementwise. Assigning a ``state`` name
writes that array in place (later statements see the new value); assigning any
other name defines an elementwise temporary; reading a state name before it is
assigned reads the old value. Every subexpression that involves only scalars and
literals is folded on the host in float64 and handed to the kernel as one value
cast to the arrays' dtype, which is what Keras does when it computes
``1 - self.beta_1`` in Python floats and then casts the result.
"""

from __future__ import annotations

import ast
import dataclasses
import keyword
import math
import textwrap
from collections.abc import Callable, Mapping

import numpy as np

from optserve.server.errors import InvalidArgumentError

# Function name -> number of arguments. ``clip`` is rewritten into
# minimum(maximum(x, lo), hi), which is also what np.clip computes.
FUNCTIONS = {
    "sqrt": 1,
    "square": 1,
    "abs": 1,
    "sign": 1,
    "exp": 1,
    "log": 1,
    "maximum": 2,
    "minimum": 2,
    "clip": 3,
    "power": 2,
    "where": 3,
}

_BINARY_OPERATORS = {ast.Add: "add", ast.Sub: "subtract", ast.Mult: "multiply", ast.Div: "divide"}
_COMPARISONS = {
    ast.Lt: "less",
    ast.LtE: "less_equal",
    ast.Gt: "greater",
    ast.GtE: "greater_equal",
    ast.Eq: "equal",
    ast.NotEq: "not_equal",
}
_COMPARISON_FUNCTIONS = frozenset(_COMPARISONS.values())

# NumPy ufunc (or helper) that implements each operation, on host and per block.
_NUMPY_FUNCTIONS = {
    "add": "add",
    "subtract": "subtract",
    "multiply": "multiply",
    "divide": "divide",
    "negative": "negative",
    "sqrt": "sqrt",
    "square": "square",
    "abs": "absolute",
    "sign": "sign",
    "exp": "exp",
    "log": "log",
    "maximum": "maximum",
    "minimum": "minimum",
    "power": "power",
    "less": "less",
    "less_equal": "less_equal",
    "greater": "greater",
    "greater_equal": "greater_equal",
    "equal": "equal",
    "not_equal": "not_equal",
}

# Infix operators: the same symbols in C and in Python.
_OPERATOR_SYMBOLS = {
    "add": "+",
    "subtract": "-",
    "multiply": "*",
    "divide": "/",
    "less": "<",
    "less_equal": "<=",
    "greater": ">",
    "greater_equal": ">=",
    "equal": "==",
    "not_equal": "!=",
}
_C_OPERATORS = _OPERATOR_SYMBOLS
_C_FUNCTIONS = {
    "sqrt": "sqrt",
    "exp": "exp",
    "log": "log",
    "abs": "fabs",
    "power": "pow",
    "square": "os_square",
    "sign": "os_sign",
    "maximum": "os_maximum",
    "minimum": "os_minimum",
}

# Device helpers that reproduce NumPy's results where CUDA's builtins differ:
# fmax/fmin drop NaNs while np.maximum/np.minimum propagate them (and return
# the second argument on a tie, which decides the sign of a zero), and np.sign
# maps NaN to NaN and -0.0 to 0.0.
_C_HELPERS = """\
template <typename T> {qualifier} T os_square(T x) {{ return x * x; }}
template <typename T> {qualifier} T os_sign(T x) {{
    return x > T(0) ? T(1) : (x < T(0) ? T(-1) : (x == T(0) ? T(0) : x));
}}
template <typename T> {qualifier} T os_maximum(T a, T b) {{
    return (a > b || a != a) ? a : b;
}}
template <typename T> {qualifier} T os_minimum(T a, T b) {{
    return (a < b || a != a) ? a : b;
}}
"""
CUDA_PREAMBLE = _C_HELPERS.format(qualifier="__device__ __forceinline__")
# The same helpers for host code (optserve.server.native_kernels).
HOST_PREAMBLE = _C_HELPERS.format(qualifier="static inline")

# Keep the device arithmetic rounding like NumPy's: no fused multiply-add contraction.
CUDA_OPTIONS = ("--fmad=false",)


# --------------------------------------------------------------------------- IR


@dataclasses.dataclass(frozen=True)
class Literal:
    value: float


@dataclasses.dataclass(frozen=True)
class ScalarRef:
    name: str


@dataclasses.dataclass(frozen=True)
class ArrayRef:
    kind: str  # "input" or "state"
    name: str


@dataclasses.dataclass(frozen=True)
class TempRef:
    version: int  # each assignment of a temporary is a new version


@dataclasses.dataclass(frozen=True)
class Constant:
    index: int  # position in the kernel's folded host values


@dataclasses.dataclass(frozen=True)
class Apply:
    function: str
    args: tuple


@dataclasses.dataclass(frozen=True)
class Statement:
    target_kind: str  # "state" or "temp"
    target: object  # state name (str) or temp version (int)
    value: object


def _is_host(node) -> bool:
    if isinstance(node, (Literal, ScalarRef)):
        return True
    if isinstance(node, Apply):
        return all(_is_host(arg) for arg in node.args)
    return False


# ----------------------------------------------------------------------- parser


class _Parser:
    """Turns the body's AST into statements; validates every name and call."""

    def __init__(self, kernel_name, inputs, state, scalars):
        self.kernel_name = kernel_name
        self.inputs = set(inputs)
        self.state = set(state)
        self.scalars = set(scalars)
        self.temps: dict[str, object] = {}  # temp name -> host expression or TempRef
        self.statements: list[Statement] = []
        self.next_version = 0

    def error(self, message, node=None):
        where = f" (line {node.lineno})" if node is not None and hasattr(node, "lineno") else ""
        return InvalidArgumentError(f"Kernel `{self.kernel_name}`{where}: {message}")

    def parse(self, body: str) -> list[Statement]:
        try:
            module = ast.parse(textwrap.dedent(body), mode="exec")
        except SyntaxError as exc:
            raise self.error(f"the body is not valid Python syntax: {exc.msg} (line {exc.lineno})") from None
        if not module.body:
            raise self.error("the body has no statements.")
        for statement in module.body:
            self.parse_statement(statement)
        return self.statements

    def parse_statement(self, statement):
        if not isinstance(statement, ast.Assign):
            raise self.error(
                f"only assignments `name = expression` are allowed. Received: {ast.unparse(statement)!r}",
                statement,
            )
        if len(statement.targets) != 1 or not isinstance(statement.targets[0], ast.Name):
            raise self.error(
                f"assign exactly one plain name per statement. Received: {ast.unparse(statement)!r}",
                statement,
            )
        target = statement.targets[0].id
        value = self.parse_expression(statement.value)
        if target in self.inputs:
            raise self.error(f"`{target}` is an input and cannot be assigned; declare it in `state`.", statement)
        if target in self.scalars:
            raise self.error(f"`{target}` is a scalar and cannot be assigned.", statement)
        if target in FUNCTIONS:
            raise self.error(f"`{target}` is a function name and cannot be assigned.", statement)
        if target in self.state:
            self.statements.append(Statement("state", target, value))
        else:
            self.bind_temp(target, value)

    def bind_temp(self, name, value):
        # Host-only and unchanging values are bound by name so that they fold and
        # alias instead of costing a scratch buffer; a state's old value must be
        # copied because the state may be overwritten later.
        if _is_host(value) or isinstance(value, TempRef) or (isinstance(value, ArrayRef) and value.kind == "input"):
            self.temps[name] = value
            return
        version = self.next_version
        self.next_version += 1
        self.statements.append(Statement("temp", version, value))
        self.temps[name] = TempRef(version)

    def parse_expression(self, node, comparison_allowed=False):
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
                raise self.error(f"only numeric literals are allowed. Received: {node.value!r}", node)
            return Literal(float(node.value))
        if isinstance(node, ast.Name):
            return self.resolve_name(node)
        if isinstance(node, ast.BinOp):
            operator = _BINARY_OPERATORS.get(type(node.op))
            if operator is None:
                raise self.error(
                    f"unsupported operator in {ast.unparse(node)!r}; allowed are + - * / and functions "
                    f"{sorted(FUNCTIONS)}.",
                    node,
                )
            return Apply(operator, (self.parse_expression(node.left), self.parse_expression(node.right)))
        if isinstance(node, ast.UnaryOp):
            if isinstance(node.op, ast.USub):
                operand = self.parse_expression(node.operand)
                if isinstance(operand, Literal):
                    return Literal(-operand.value)
                return Apply("negative", (operand,))
            if isinstance(node.op, ast.UAdd):
                return self.parse_expression(node.operand)
            raise self.error(f"unsupported unary operator in {ast.unparse(node)!r}.", node)
        if isinstance(node, ast.Call):
            return self.parse_call(node)
        if isinstance(node, ast.Compare):
            if not comparison_allowed:
                raise self.error(
                    f"a comparison is only allowed as the first argument of where(). Received: {ast.unparse(node)!r}",
                    node,
                )
            if len(node.ops) != 1:
                raise self.error(f"chained comparisons are not allowed. Received: {ast.unparse(node)!r}", node)
            return Apply(
                _COMPARISONS[type(node.ops[0])],
                (self.parse_expression(node.left), self.parse_expression(node.comparators[0])),
            )
        raise self.error(f"unsupported expression {ast.unparse(node)!r}.", node)

    def resolve_name(self, node):
        name = node.id
        if name in self.temps:
            return self.temps[name]
        if name in self.state:
            return ArrayRef("state", name)
        if name in self.inputs:
            return ArrayRef("input", name)
        if name in self.scalars:
            return ScalarRef(name)
        if name in FUNCTIONS:
            raise self.error(f"`{name}` is a function; call it as {name}(...).", node)
        raise self.error(
            f"unknown name `{name}`. Declare it in `inputs`, `state` or `scalars`, or assign it first.", node
        )

    def parse_call(self, node):
        if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
            raise self.error(
                f"unknown function in {ast.unparse(node)!r}. Allowed functions: {sorted(FUNCTIONS)}.", node
            )
        function = node.func.id
        if node.keywords:
            raise self.error(f"{function}() takes no keyword arguments. Received: {ast.unparse(node)!r}", node)
        arity = FUNCTIONS[function]
        if len(node.args) != arity:
            raise self.error(
                f"{function}() takes {arity} argument(s), got {len(node.args)}: {ast.unparse(node)!r}", node
            )
        if function == "where":
            condition = node.args[0]
            if not isinstance(condition, ast.Compare):
                raise self.error(
                    f"the first argument of where() must be a comparison. Received: {ast.unparse(condition)!r}",
                    node,
                )
            args = [self.parse_expression(condition, comparison_allowed=True)]
            args += [self.parse_expression(arg) for arg in node.args[1:]]
            return Apply("where", tuple(args))
        args = tuple(self.parse_expression(arg) for arg in node.args)
        if function == "clip":
            value, low, high = args
            return Apply("minimum", (Apply("maximum", (value, low)), high))
        return Apply(function, args)


# ---------------------------------------------------------------------- folding


class _Folder:
    """Replaces maximal host-only subtrees of array expressions with Constant slots."""

    def __init__(self):
        self.host_values: list = []  # host expression per Constant index
        self.index_of: dict = {}

    def constant(self, host_expression) -> Constant:
        index = self.index_of.get(host_expression)
        if index is None:
            index = len(self.host_values)
            self.host_values.append(host_expression)
            self.index_of[host_expression] = index
        return Constant(index)

    def fold(self, node):
        if _is_host(node):
            return self.constant(node)
        if isinstance(node, Apply):
            return Apply(node.function, tuple(self.fold(arg) for arg in node.args))
        return node


def _reads(node, found: set):
    if isinstance(node, TempRef):
        found.add(node.version)
    elif isinstance(node, Apply):
        for arg in node.args:
            _reads(arg, found)


def _drop_dead_temps(statements):
    """Removes temporaries that no later statement reads (they cannot affect state)."""
    live: set = set()
    kept = []
    for statement in reversed(statements):
        if statement.target_kind == "temp" and statement.target not in live:
            continue
        if statement.target_kind == "state" and statement.value == ArrayRef("state", statement.target):
            continue  # `var = var` changes nothing
        _reads(statement.value, live)
        kept.append(statement)
    return kept[::-1]


# ------------------------------------------------------------ host evaluation


_PYTHON_OPERATORS = {name: _OPERATOR_SYMBOLS[name] for name in ("add", "subtract", "multiply")}
_PYTHON_COMPARISONS = {name: _OPERATOR_SYMBOLS[name] for name in _COMPARISON_FUNCTIONS}


def _host_python(node) -> str:
    """Python source of a host expression over Python floats (IEEE float64, like Keras's own math)."""
    if isinstance(node, Literal):
        return repr(node.value)
    if isinstance(node, ScalarRef):
        return f"s_{node.name}"
    args = [_host_python(arg) for arg in node.args]
    function = node.function
    if function in _PYTHON_OPERATORS:
        return f"({args[0]} {_PYTHON_OPERATORS[function]} {args[1]})"
    if function in _PYTHON_COMPARISONS:
        # A folded condition travels as 1.0 / 0.0 like every other host value.
        return f"float({args[0]} {_PYTHON_COMPARISONS[function]} {args[1]})"
    if function == "negative":
        return f"(-{args[0]})"
    if function == "where":
        return f"({args[1]} if {args[0]} else {args[2]})"
    return f"h_{function}({', '.join(args)})"


def _host_function(fast, numpy_function):
    """Python's math where it is defined; NumPy's IEEE result (inf, nan) where Python raises."""

    def evaluate(*args):
        try:
            return float(fast(*args))
        except (ArithmeticError, ValueError):
            with np.errstate(all="ignore"):
                return float(numpy_function(*(np.float64(arg) for arg in args)))

    return evaluate


def _python_sign(x):
    return 1.0 if x > 0 else (-1.0 if x < 0 else (0.0 if x == 0 else x))


def _python_maximum(a, b):
    return a if (a > b or a != a) else b  # as np.maximum: NaN propagates, a tie gives b


def _python_minimum(a, b):
    return a if (a < b or a != a) else b


def _host_namespace():
    fast = {
        "divide": lambda a, b: a / b,
        "sqrt": math.sqrt,
        "square": lambda x: x * x,
        "abs": abs,
        "sign": _python_sign,
        "exp": math.exp,
        "log": math.log,
        "maximum": _python_maximum,
        "minimum": _python_minimum,
        "power": math.pow,
    }
    return {
        f"h_{name}": _host_function(function, getattr(np, _NUMPY_FUNCTIONS[name])) for name, function in fast.items()
    }


# ----------------------------------------------------------- NumPy generation


class _NumpyEmitter:
    """Generates the Python source of one block step: ufunc calls with ``out=``.

    Intermediate values live in float scratch registers ``s0, s1, ...`` (bool
    registers ``b0, ...`` hold comparisons); a register is reused as soon as
    its value is dead, so the block's working set stays small.
    """

    def __init__(self, statements):
        self.statements = statements
        self.lines: list[str] = []
        self.free = {"s": [], "b": []}
        self.count = {"s": 0, "b": 0}
        self.temp_register: dict[int, str] = {}
        self.last_read = self.find_last_reads()

    def find_last_reads(self):
        last = {}
        for position, statement in enumerate(self.statements):
            found: set = set()
            _reads(statement.value, found)
            for version in found:
                last[version] = position
        return last

    def allocate(self, kind):
        if self.free[kind]:
            return self.free[kind].pop()
        register = f"{kind}{self.count[kind]}"
        self.count[kind] += 1
        return register

    def release(self, register):
        if register is not None:
            self.free[register[0]].append(register)
            self.free[register[0]].sort(reverse=True)  # hand out low numbers first

    def generate(self):
        for position, statement in enumerate(self.statements):
            if statement.target_kind == "state":
                self.emit_into(statement.value, f"a_{statement.target}")
            else:
                self.temp_register[statement.target] = self.emit_temp(statement.value)
            for version, last in self.last_read.items():
                if last == position:
                    self.release(self.temp_register.pop(version))
        return self.lines

    def emit_into(self, node, destination):
        text, owned = self.emit(node, destination)
        if text != destination:
            self.lines.append(f"copyto({destination}, {text})")
        self.release(owned)

    def emit_temp(self, node):
        text, owned = self.emit(node, None)
        if owned is not None:
            return owned
        register = self.allocate("s")  # a state's old value, copied before it changes
        self.lines.append(f"copyto({register}, {text})")
        return register

    def emit(self, node, destination):
        """Emits code for ``node``; returns (operand text, scratch register it owns or None)."""
        if isinstance(node, ArrayRef):
            return f"a_{node.name}", None
        if isinstance(node, TempRef):
            return self.temp_register[node.version], None
        if isinstance(node, Constant):
            return f"c{node.index}", None
        if node.function == "where":
            return self.emit_where(node, destination)
        operands = [self.emit(arg, None) for arg in node.args]
        is_comparison = node.function in _COMPARISON_FUNCTIONS
        kind = "b" if is_comparison else "s"
        reusable = [owned for _, owned in operands if owned is not None and owned[0] == kind]
        if destination is not None:
            output, owned = destination, None
        elif reusable:
            output = owned = reusable[0]
        else:
            output = owned = self.allocate(kind)
        arguments = ", ".join(text for text, _ in operands)
        self.lines.append(f"{_NUMPY_FUNCTIONS[node.function]}({arguments}, out={output})")
        for _, register in operands:
            if register != owned:
                self.release(register)
        return output, owned

    def emit_where(self, node, destination):
        condition, when_true, when_false = (self.emit(arg, None) for arg in node.args)
        condition_text = condition[0]
        host_condition = condition[1] is None  # a folded 1.0 / 0.0 constant
        reusable = [owned for _, owned in (when_true, when_false) if owned is not None]
        if destination is not None:
            output, owned = destination, None
        elif reusable:
            output = owned = reusable[0]
        else:
            output = owned = self.allocate("s")
        true_text, false_text = when_true[0], when_false[0]
        if output == true_text and output == false_text:
            pass
        elif output == false_text:
            mask = f"({condition_text} != 0)" if host_condition else condition_text
            self.lines.append(f"copyto({output}, {true_text}, where={mask})")
        elif output == true_text:
            if host_condition:
                mask = f"({condition_text} == 0)"
            else:
                self.lines.append(f"logical_not({condition_text}, out={condition_text})")
                mask = condition_text
            self.lines.append(f"copyto({output}, {false_text}, where={mask})")
        else:
            mask = f"({condition_text} != 0)" if host_condition else condition_text
            self.lines.append(f"copyto({output}, {false_text})")
            self.lines.append(f"copyto({output}, {true_text}, where={mask})")
        for register in (condition[1], when_true[1], when_false[1]):
            if register != owned:
                self.release(register)
        return output, owned


def _numpy_namespace():
    namespace = {name: getattr(np, name) for name in set(_NUMPY_FUNCTIONS.values())}
    namespace["copyto"] = np.copyto
    namespace["logical_not"] = np.logical_not
    return namespace


@dataclasses.dataclass(frozen=True, eq=False)  # identity hash: used as a cache key
class NumpyProgram:
    """The NumPy form of a kernel: ``step(*arrays, *scratch, *constants)`` updates one block."""

    source: str
    step: Callable
    array_names: tuple  # inputs then state, the order ``step`` takes them
    float_scratch: int  # number of dtype scratch buffers per block
    bool_scratch: int  # number of bool scratch buffers per block


# ------------------------------------------------------------ CUDA generation


@dataclasses.dataclass(frozen=True)
class CudaSource:
    """Everything ``cupy.ElementwiseKernel`` needs, as plain strings."""

    name: str
    in_params: str
    out_params: str
    operation: str
    preamble: str
    options: tuple


def _c_expression(node) -> str:
    if isinstance(node, ArrayRef):
        prefix = {"input": "in", "local": "v", "state": "s"}[node.kind]
        return f"{prefix}_{node.name}"
    if isinstance(node, TempRef):
        return f"t{node.version}"
    if isinstance(node, Constant):
        return f"c{node.index}"
    args = [_c_expression(arg) for arg in node.args]
    function = node.function
    if function == "negative":
        return f"(-{args[0]})"
    if function == "where":
        condition = args[0]
        if isinstance(node.args[0], Constant):  # folded condition: 1.0 / 0.0
            condition = f"({condition} != T(0))"
        return f"({condition} ? {args[1]} : {args[2]})"
    if function in _C_OPERATORS:
        return f"({args[0]} {_C_OPERATORS[function]} {args[1]})"
    return f"{_C_FUNCTIONS[function]}({', '.join(args)})"


# ------------------------------------------------------------------ the kernel


def _check_names(kernel_name, inputs, state, scalars):
    if not isinstance(kernel_name, str) or not kernel_name.isidentifier() or keyword.iskeyword(kernel_name):
        raise InvalidArgumentError(f"`name` must be a Python identifier. Received: name={kernel_name!r}")
    seen: dict[str, str] = {}
    for group, names in (("inputs", inputs), ("state", state), ("scalars", scalars)):
        for name in names:
            if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
                raise InvalidArgumentError(
                    f"Kernel `{kernel_name}`: every name in `{group}` must be a Python identifier. Received: {name!r}"
                )
            if name.startswith("_"):
                raise InvalidArgumentError(
                    f"Kernel `{kernel_name}`: names may not start with an underscore. Received: {name!r}"
                )
            if name in FUNCTIONS:
                raise InvalidArgumentError(
                    f"Kernel `{kernel_name}`: `{name}` is a function name and cannot name a value."
                )
            if name in seen:
                raise InvalidArgumentError(
                    f"Kernel `{kernel_name}`: `{name}` is declared twice (in `{seen[name]}` and `{group}`)."
                )
            seen[name] = group
    if not state:
        raise InvalidArgumentError(f"Kernel `{kernel_name}`: `state` must name at least one array.")


class UpdateKernel:
    """One optimizer update, defined once, runnable by every backend.

    Args:
        name: identifier used for the device kernel and in messages.
        inputs: names of arrays that are only read.
        state: names of arrays updated in place.
        scalars: names of host numbers given on each call.
        body: statements ``name = expression`` (see the module docstring).
    """

    def __init__(self, name: str, inputs, state, scalars, body: str):
        for group, names in (("inputs", inputs), ("state", state), ("scalars", scalars)):
            if isinstance(names, str):  # ("x") instead of ("x",) would declare x as single letters
                raise InvalidArgumentError(
                    f"Kernel `{name}`: `{group}` must be a sequence of names, not a string. Received: {group}={names!r}"
                )
        inputs, state, scalars = tuple(inputs), tuple(state), tuple(scalars)
        _check_names(name, inputs, state, scalars)
        if not isinstance(body, str):
            raise InvalidArgumentError(f"Kernel `{name}`: `body` must be a string. Received: {type(body).__name__}")
        self.name = name
        self.inputs = inputs
        self.state = state
        self.scalars = scalars
        self.body = body
        parsed = _Parser(name, inputs, state, scalars).parse(body)
        folder = _Folder()
        folded = [dataclasses.replace(s, value=folder.fold(s.value)) for s in parsed]
        self.statements: tuple = tuple(_drop_dead_temps(folded))
        self.host_values: tuple = tuple(folder.host_values)
        self.assigned_state = tuple(
            name for name in state if any(s.target_kind == "state" and s.target == name for s in self.statements)
        )
        self.array_names = inputs + state
        self._host_function = self._compile_host_function()
        self.numpy_program = self._compile_numpy_program()
        self._cuda_source: CudaSource | None = None
        self._copying: dict[tuple[str, int], UpdateKernel] = {}
        self._summing: UpdateKernel | None = None

    def __repr__(self):
        return f"UpdateKernel(name={self.name!r}, inputs={self.inputs}, state={self.state}, scalars={self.scalars})"

    # ---------------------------------------------------------------- host

    def _compile_host_function(self):
        parameters = ", ".join(f"s_{name}" for name in self.scalars)
        values = ", ".join(_host_python(value) for value in self.host_values)
        source = f"def host_values({parameters}):\n    return ({values}{',' if values else ''})\n"
        namespace = _host_namespace()
        exec(compile(source, f"<kernel {self.name} host values>", "exec"), namespace)
        self.host_source = source
        return namespace["host_values"]

    def check_scalars(self, scalars: Mapping) -> list[float]:
        """Validates the per-call scalars; returns them as Python floats in declaration order."""
        if not isinstance(scalars, (dict, Mapping)):
            raise InvalidArgumentError(
                f"Kernel `{self.name}`: `scalars` must be a dict. Received: {type(scalars).__name__}"
            )
        if len(scalars) != len(self.scalars) or any(name not in scalars for name in self.scalars):
            missing = [name for name in self.scalars if name not in scalars]
            unexpected = [name for name in scalars if name not in self.scalars]
            raise InvalidArgumentError(
                f"Kernel `{self.name}` takes scalars {list(self.scalars)}. "
                f"Missing: {missing}; unexpected: {unexpected}."
            )
        return [_real_number(self.name, name, scalars[name]) for name in self.scalars]

    def host_constants(self, scalars: Mapping, dtype) -> tuple:
        """The folded host values for one call, computed in float64 then cast to ``dtype``."""
        cast = np.dtype(dtype).type
        return tuple(cast(value) for value in self._host_function(*self.check_scalars(scalars)))

    # --------------------------------------------------------------- NumPy

    def _compile_numpy_program(self) -> NumpyProgram:
        emitter = _NumpyEmitter(self.statements)
        lines = emitter.generate()
        floats = [f"s{i}" for i in range(emitter.count["s"])]
        bools = [f"b{i}" for i in range(emitter.count["b"])]
        constants = [f"c{i}" for i in range(len(self.host_values))]
        parameters = [f"a_{name}" for name in self.array_names] + floats + bools + constants
        source = f"def step({', '.join(parameters)}):\n" + "".join(f"    {line}\n" for line in lines or ["pass"])
        namespace = _numpy_namespace()
        exec(compile(source, f"<kernel {self.name} numpy step>", "exec"), namespace)
        return NumpyProgram(
            source=source,
            step=namespace["step"],
            array_names=self.array_names,
            float_scratch=len(floats),
            bool_scratch=len(bools),
        )

    # ---------------------------------------------------------------- CUDA

    def cuda_source(self) -> CudaSource:
        """The fused ElementwiseKernel's source (plain strings; CuPy is not imported)."""
        if self._cuda_source is None:
            self._cuda_source = self._generate_cuda_source()
        return self._cuda_source

    def _generate_cuda_source(self) -> CudaSource:
        in_params = [f"T in_{name}" for name in self.inputs]
        in_params += [f"T c{index}" for index in range(len(self.host_values))]
        out_params = [f"T s_{name}" for name in self.state]
        return CudaSource(
            name=f"optserve_{self.name}",
            in_params=", ".join(in_params),
            out_params=", ".join(out_params),
            operation=self.c_operation(),
            preamble=CUDA_PREAMBLE,
            options=CUDA_OPTIONS,
        )

    def c_operation(self) -> str:
        """One element's update in C++ (CUDA's and the host's): reads ``in_<input>``, the
        constants ``c<i>`` and the state references ``s_<state>``, all of type ``T``."""
        # State is loaded into registers once and stored once: reading a state
        # before its assignment sees the old value, after it the new one.
        read_state = set()
        for statement in self.statements:
            found: set = set()
            _collect_state_reads(statement.value, found)
            read_state |= found
        lines = []
        locals_ = {name: f"v_{name}" for name in self.state}
        for name in self.state:
            if name in read_state:
                lines.append(f"T v_{name} = s_{name};")
            elif name in self.assigned_state:
                lines.append(f"T v_{name};")
        for statement in self.statements:
            expression = _c_expression(_rename_state(statement.value))
            if statement.target_kind == "state":
                lines.append(f"{locals_[statement.target]} = {expression};")
            else:
                lines.append(f"const T t{statement.target} = {expression};")
        for name in self.assigned_state:
            lines.append(f"s_{name} = v_{name};")
        return "\n".join(lines)

    def copying(self, state: str, count: int) -> UpdateKernel:
        """This kernel, also writing the new ``state`` into ``count`` more arrays ``copy_0``, ...,
        in the same pass (a step's reply written while the values are in registers)."""
        key = (state, count)
        copies = self._copying.get(key)
        if copies is None:
            if state not in self.state:
                raise InvalidArgumentError(f"Kernel `{self.name}` has no state `{state}` to copy.")
            names = tuple(copy_name(index) for index in range(count))
            body = textwrap.dedent(self.body) + "".join(f"\n{name} = {state}" for name in names) + "\n"
            copies = UpdateKernel(f"{self.name}_copy{count}", self.inputs, self.state + names, self.scalars, body)
            self._copying[key] = copies
        return copies

    def summing(self) -> UpdateKernel:
        """This kernel, its gradient first summed with one more input ``grad_addend`` in the same pass
        (a sync step's last push added to the others' by the update itself). The sum is one rounded
        addition of ``grad`` and ``grad_addend``, as ``np.add`` makes it: the same bits as adding first."""
        if self._summing is None:
            body = ast.parse(textwrap.dedent(self.body))
            names = {node.id for node in ast.walk(body) if isinstance(node, ast.Name)}
            if GRADIENT not in self.inputs or ADDEND in self.array_names or SUMMED in names:
                raise InvalidArgumentError(
                    f"Kernel `{self.name}` cannot sum its gradient: it needs an input `{GRADIENT}` and no name "
                    f"`{ADDEND}` or `{SUMMED}`."
                )
            for node in ast.walk(body):
                if isinstance(node, ast.Name) and node.id == GRADIENT:
                    node.id = SUMMED
            source = f"{SUMMED} = {GRADIENT} + {ADDEND}\n{ast.unparse(body)}\n"
            self._summing = UpdateKernel(
                f"{self.name}_summing", self.inputs + (ADDEND,), self.state, self.scalars, source
            )
        return self._summing

    def functions(self) -> frozenset:
        """The operations the body uses (``add``, ``sqrt``, ``less``, ...)."""
        found: set = set()
        for statement in self.statements:
            _collect_functions(statement.value, found)
        return frozenset(found)


# The gradient input of every optimizer's kernel, and what UpdateKernel.summing adds to it.
GRADIENT, ADDEND, SUMMED = "grad", "grad_addend", "summed_grad"
# The dtypes every kernel runs in (a C float or double, as the NumPy programs compute them).
SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


_COPY_NAMES = tuple(f"copy_{index}" for index in range(16))


def copy_name(index: int) -> str:
    """The name of the ``index``-th array a copying kernel (``UpdateKernel.copying``) writes."""
    return _COPY_NAMES[index] if index < len(_COPY_NAMES) else f"copy_{index}"


def _real_number(kernel_name, name, value) -> float:
    if type(value) is float:  # the common case, checked first because calls are frequent
        return value
    is_real = isinstance(value, (int, float, np.integer, np.floating)) or (
        isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iuf"
    )
    if is_real and not isinstance(value, (bool, np.bool_)):
        try:
            return float(value)
        except OverflowError:  # an int beyond float64
            pass
    raise InvalidArgumentError(
        f"Kernel `{kernel_name}`: scalar `{name}` must be a real number. Received: {name}={value!r}"
    )


def _collect_state_reads(node, found: set):
    if isinstance(node, ArrayRef) and node.kind == "state":
        found.add(node.name)
    elif isinstance(node, Apply):
        for arg in node.args:
            _collect_state_reads(arg, found)


def _collect_functions(node, found: set):
    if isinstance(node, Apply):
        found.add(node.function)
        for arg in node.args:
            _collect_functions(arg, found)


def _rename_state(node):
    """State reads refer to the register copy ``v_<name>`` inside the device kernel."""
    if isinstance(node, ArrayRef) and node.kind == "state":
        return ArrayRef("local", node.name)
    if isinstance(node, Apply):
        return Apply(node.function, tuple(_rename_state(arg) for arg in node.args))
    return node
