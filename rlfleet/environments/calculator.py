"""A calculator tool for chat models that call tools the Qwen way (Qwen2.5 / Qwen3 chat templates).

The model asks for a calculation inside its turn::

    <tool_call>
    {"name": "calculator", "arguments": {"expression": "(48 + 24) / 3"}}
    </tool_call>

and the environment answers each call with a ``{"role": "tool", "content": "24"}`` message; a turn without a tool
call is the model's answer and ends the episode. Expressions are never run as code (no ``eval``): they are parsed
with :func:`ast.parse` and only numbers, unary ``+``/``-``, ``+ - * / // % **`` and parentheses are evaluated, with
exact decimal arithmetic (``0.1 + 0.2`` is ``0.3``) and bounded sizes (``9**9**9`` is refused at once). Bad
expressions and malformed calls are answered with an ``error: ...`` text, so the model can retry.

Job config::

    algorithm:
      environment: calculator
      reward_funcs: [rlfleet.rewards:gsm8k_accuracy]
    generation:
      max_turns: 4
"""

from __future__ import annotations

import ast
import json
import re
from decimal import Context, Decimal, DecimalException, DivisionByZero, InvalidOperation, Overflow

from rlfleet.environments import Environment

MAX_LENGTH = 200  # characters of an expression
MAX_EXPONENT = 100  # largest |exponent| of ``**``; results must also stay below 1e100
# Exact to 28 significant digits; overflow, division by zero and undefined results (0**0) raise.
_CONTEXT = Context(prec=28, Emax=MAX_EXPONENT - 1, Emin=-MAX_EXPONENT,
                   traps=[InvalidOperation, DivisionByZero, Overflow])
_BINARY = {ast.Add: _CONTEXT.add, ast.Sub: _CONTEXT.subtract, ast.Mult: _CONTEXT.multiply}
_OPERATORS = (ast.UAdd, ast.USub, *_BINARY, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow)
# A tool call's JSON; an unclosed last block (the turn ended first) counts too, as in vLLM's Hermes parser.
_TOOL_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)


class CalculatorError(ValueError):
    """An expression the calculator refuses; its message (``error: ...``) is the tool's answer to the model."""


def evaluate(expression: str) -> Decimal:
    """The exact decimal value of an arithmetic ``expression``; raises :class:`CalculatorError` on anything else."""
    if len(expression) > MAX_LENGTH:
        raise CalculatorError(f"error: expression longer than {MAX_LENGTH} characters")
    if "," in expression:
        raise CalculatorError("error: commas are not allowed (write 1000, not 1,000)")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError) as err:
        raise CalculatorError(f"error: invalid expression: {getattr(err, 'msg', err)}") from None
    try:
        return _value(tree.body, expression.strip())
    except Overflow:
        raise CalculatorError(f"error: result too large (must stay below 1e{MAX_EXPONENT})") from None
    except DecimalException:
        raise CalculatorError("error: undefined result, or too many digits") from None


def _value(node: ast.AST, source: str) -> Decimal:
    """The value of one whitelisted AST node (recursive)."""
    if isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CalculatorError(f"error: unsupported constant of type {type(value).__name__}")
        if isinstance(value, float):  # the literal's own digits, not its binary approximation: "0.1" is exactly 0.1
            value = ast.get_source_segment(source, node) or repr(value)
        return _CONTEXT.plus(Decimal(value))
    if not isinstance(node, (ast.UnaryOp, ast.BinOp)):
        raise CalculatorError(f"error: unsupported syntax: {type(node).__name__}")
    op = type(node.op)
    if op not in _OPERATORS:
        raise CalculatorError(f"error: unsupported operator: {op.__name__}")
    if isinstance(node, ast.UnaryOp):
        operand = _value(node.operand, source)
        return _CONTEXT.plus(operand) if op is ast.UAdd else _CONTEXT.minus(operand)
    left, right = _value(node.left, source), _value(node.right, source)
    if op in _BINARY:
        return _BINARY[op](left, right)
    if op is ast.Pow:
        if abs(right) > MAX_EXPONENT:
            raise CalculatorError(f"error: exponent too large (at most {MAX_EXPONENT})")
        if left == 0 and right < 0:  # Decimal would answer Infinity
            raise CalculatorError("error: division by zero")
        return _CONTEXT.power(left, right)
    if right == 0:
        raise CalculatorError("error: division by zero")
    if op is ast.Div:
        return _CONTEXT.divide(left, right)
    # Python's floor semantics (-7 // 2 == -4, -7 % 2 == 1); Decimal's own divmod truncates towards zero.
    quotient, remainder = _CONTEXT.divmod(left, right)
    if remainder != 0 and (remainder < 0) != (right < 0):
        quotient, remainder = _CONTEXT.subtract(quotient, 1), _CONTEXT.add(remainder, right)
    return quotient if op is ast.FloorDiv else remainder


def format_number(value: Decimal | int | float) -> str:
    """``value`` as plain decimal text for the model: ``12`` not ``12.0``, ``0.3``, no exponent, 12 decimals at most."""
    number = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    if not number.is_finite():
        return str(number)
    context = Context(prec=max(28, number.adjusted() + 14))  # room for every integer digit and 12 decimals
    if number.as_tuple().exponent < -12:
        number = number.quantize(Decimal("1e-12"), context=context)
    number = number.normalize(context)
    return "0" if number == 0 else f"{number:f}"


def parse_tool_calls(text: str) -> list[dict]:
    """The Qwen-style tool calls in an assistant message: ``{"name", "arguments"}`` dicts, or ``{"error": ...}``
    for a block that is not a JSON object with a string ``name`` and an object ``arguments``."""
    calls = []
    for block in _TOOL_CALL.findall(text):
        try:
            call = json.loads(block)
            if isinstance(call, dict) and isinstance(call.get("arguments"), str):  # some models send a JSON string
                call["arguments"] = json.loads(call["arguments"])
        except (json.JSONDecodeError, RecursionError) as err:
            calls.append({"error": f"error: tool call is not valid JSON: {err}"})
            continue
        if isinstance(call, dict) and isinstance(call.get("name"), str) and isinstance(call.get("arguments"), dict):
            calls.append({"name": call["name"], "arguments": call["arguments"]})
        else:
            calls.append({"error": 'error: a tool call is {"name": <string>, "arguments": <object>}'})
    return calls


class Calculator(Environment):
    """Answers each ``calculator`` tool call of the model's turn with its result; a turn without a call ends the
    episode. ``state["calls"]`` counts the calls answered (for metrics)."""

    tools = [{
        "type": "function",
        "function": {
            "name": "calculator",
            "description": "Evaluate an arithmetic expression (+ - * / // % ** and parentheses) exactly.",
            "parameters": {
                "type": "object",
                "properties": {"expression": {
                    "type": "string", "description": "The expression, with plain numbers, e.g. \"(48 + 24) / 3\"."}},
                "required": ["expression"],
            },
        },
    }]

    def __init__(self, max_calls_per_turn: int = 4):
        if isinstance(max_calls_per_turn, bool) or not isinstance(max_calls_per_turn, int) or max_calls_per_turn < 1:
            raise ValueError(f"algorithm.environment_kwargs.max_calls_per_turn: {max_calls_per_turn!r} must be an "
                             "integer >= 1")
        self.max_calls_per_turn = max_calls_per_turn

    def setup_state(self, record: dict) -> dict:
        return {"record": record, "calls": 0}

    def is_completed(self, messages: list[dict], state: dict) -> bool:
        return not _TOOL_CALL.search(messages[-1].get("content") or "")

    def env_response(self, messages: list[dict], state: dict) -> list[dict]:
        calls = parse_tool_calls(messages[-1].get("content") or "")
        answered = calls[: self.max_calls_per_turn]
        state["calls"] = state.get("calls", 0) + len(answered)
        replies = [{"role": "tool", "content": self._answer(call)} for call in answered]
        if len(calls) > len(answered):
            replies.append({"role": "tool", "content": f"error: at most {self.max_calls_per_turn} tool calls per "
                                                       f"turn; {len(calls) - len(answered)} not answered"})
        return replies

    @staticmethod
    def _answer(call: dict) -> str:
        """The tool's answer to one parsed call: the result, or an ``error: ...`` text."""
        if "error" in call:
            return call["error"]
        if call["name"] != "calculator":
            return f"error: unknown tool {call['name']}"
        expression = call["arguments"].get("expression")
        if not isinstance(expression, str):
            return 'error: calculator needs {"expression": <string>}'
        try:
            return format_number(evaluate(expression))
        except CalculatorError as err:
            return str(err)
