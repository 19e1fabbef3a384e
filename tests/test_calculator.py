"""The calculator environment: the safe arithmetic evaluator, number formatting, Qwen-style tool-call parsing and
the environment's answers. Expected values are worked out by hand in the comments."""

from __future__ import annotations

import json
import time
from decimal import Decimal

import pytest

from rlfleet.environments import make_environment
from rlfleet.environments.calculator import Calculator, CalculatorError, evaluate, format_number, parse_tool_calls


def tool_call(name: str, arguments) -> str:
    """One tool call as a Qwen chat template writes it."""
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def assistant(content: str) -> list[dict]:
    """A conversation whose last message is the model's turn ``content``."""
    return [{"role": "user", "content": "What is 48 + 24?"}, {"role": "assistant", "content": content}]


# --- evaluate ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("expression", "expected"), [
    ("48 + 24", "72"),
    ("72 / 3", "24"),
    ("0.1 + 0.2", "0.3"),  # exact decimals: a float sum would be 0.30000000000000004
    ("1.5 * 4", "6.0"),  # 15 * 4 = 60, one decimal place
    ("2 + 3 * 4", "14"),  # * before +
    ("(2 + 3) * 4", "20"),
    ("2 * (3 + 4) - 10 / 4", "11.5"),  # 14 - 2.5
    ("-5 + 2", "-3"),
    ("-(-2)", "2"),
    ("+7", "7"),
    ("7 // 2", "3"),
    ("7 % 3", "1"),
    ("-7 // 2", "-4"),  # floor, as in Python: -3.5 rounds down to -4
    ("-7 % 2", "1"),  # -7 = 2 * (-4) + 1
    ("7 % -2", "-1"),  # 7 = -2 * (-4) - 1: the sign follows the divisor
    ("7.5 // 2", "3"),
    ("2 ** 10", "1024"),
    ("2 ** -1", "0.5"),
    ("-2 ** 2", "-4"),  # ** binds tighter than unary minus: -(2 ** 2)
    ("2 ** 3 ** 2", "512"),  # right-associative: 2 ** 9
    ("10 ** 99", "1E+99"),
    ("  3 ", "3"),
])
def test_evaluate_exact_values(expression, expected):
    assert evaluate(expression) == Decimal(expected)


def test_evaluate_keeps_every_digit_of_a_decimal_literal():
    # 22 significant digits, more than a float holds
    assert evaluate("0.1234567890123456789012") == Decimal("0.1234567890123456789012")


@pytest.mark.parametrize(("expression", "message"), [
    ("__import__('os')", "error: unsupported syntax: Call"),
    ("x + 1", "error: unsupported syntax: Name"),
    ("abs(-1)", "error: unsupported syntax: Call"),
    ("(1).real", "error: unsupported syntax: Attribute"),
    ("'ab'[0]", "error: unsupported syntax: Subscript"),
    ("'12' * 2", "error: unsupported constant of type str"),
    ("True + 1", "error: unsupported constant of type bool"),
    ("2j", "error: unsupported constant of type complex"),
    ("1 < 2", "error: unsupported syntax: Compare"),
    ("lambda: 1", "error: unsupported syntax: Lambda"),
    ("not 1", "error: unsupported operator: Not"),
    ("6 & 3", "error: unsupported operator: BitAnd"),
    ("1,000 + 1", "error: commas are not allowed (write 1000, not 1,000)"),
    ("1 / 0", "error: division by zero"),
    ("1 // 0", "error: division by zero"),
    ("5 % 0.0", "error: division by zero"),
    ("0 ** -1", "error: division by zero"),
    ("0 ** 0", "error: undefined result, or too many digits"),
    ("(-8) ** 0.5", "error: undefined result, or too many digits"),
    ("2 ** 101", "error: exponent too large (at most 100)"),
    ("10 ** 100", "error: result too large (must stay below 1e100)"),
    ("2 +", "error: invalid expression: invalid syntax"),
])
def test_evaluate_refusals(expression, message):
    with pytest.raises(CalculatorError) as err:
        evaluate(expression)
    assert str(err.value) == message


def test_evaluate_refuses_huge_powers_fast():
    start = time.monotonic()
    for expression in ("9**9**9", "(9**99)**99", "2**2**2**2**2"):
        with pytest.raises(CalculatorError, match="too large"):
            evaluate(expression)
    assert time.monotonic() - start < 1.0


def test_evaluate_refuses_long_input():
    evaluate("1+" * 99 + "1")  # 199 characters: accepted
    with pytest.raises(CalculatorError, match="longer than 200 characters"):
        evaluate("1+" * 100 + "1")  # 201 characters


def test_calculator_error_is_a_value_error():
    assert issubclass(CalculatorError, ValueError)


# --- format_number ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "expected"), [
    (Decimal("12.0"), "12"),
    (Decimal("12"), "12"),
    (12, "12"),
    (Decimal("0.3"), "0.3"),
    (Decimal("2.50"), "2.5"),
    (2.5, "2.5"),
    (0.1 + 0.2, "0.3"),  # 0.30000000000000004 rounds to 12 decimals
    (Decimal("-4"), "-4"),
    (Decimal("1E+5"), "100000"),  # no exponent notation
    (Decimal("1E-7"), "0.0000001"),
    (Decimal(1) / Decimal(3), "0.333333333333"),
    (Decimal(2) / Decimal(3), "0.666666666667"),  # rounded, not cut
    (Decimal("-1E-20"), "0"),  # rounds to zero, without a minus sign
    (Decimal("123456789012345678901234567890.5"), "123456789012345678901234567890.5"),
])
def test_format_number(value, expected):
    assert format_number(value) == expected


def test_format_number_of_evaluate():
    assert format_number(evaluate("(48 + 24) / 3")) == "24"
    assert format_number(evaluate("10 ** 99")) == "1" + "0" * 99


# --- parse_tool_calls -------------------------------------------------------------------------------------------

def test_parse_one_tool_call():
    text = "Let me compute.\n" + tool_call("calculator", {"expression": "48 + 24"})
    assert parse_tool_calls(text) == [{"name": "calculator", "arguments": {"expression": "48 + 24"}}]


def test_parse_two_tool_calls():
    text = tool_call("calculator", {"expression": "1 + 1"}) + "\n" + tool_call("calculator", {"expression": "2 * 3"})
    assert parse_tool_calls(text) == [
        {"name": "calculator", "arguments": {"expression": "1 + 1"}},
        {"name": "calculator", "arguments": {"expression": "2 * 3"}},
    ]


def test_parse_no_tool_call():
    assert parse_tool_calls("The answer is 72.\n#### 72") == []


def test_parse_arguments_as_a_json_string():
    text = tool_call("calculator", json.dumps({"expression": "5 - 2"}))
    assert parse_tool_calls(text) == [{"name": "calculator", "arguments": {"expression": "5 - 2"}}]


def test_parse_invalid_json_is_an_error_entry():
    calls = parse_tool_calls('<tool_call>\n{"name": "calculator", "arguments": {"expression": 1 +}\n</tool_call>')
    assert len(calls) == 1 and calls[0]["error"].startswith("error: tool call is not valid JSON")


@pytest.mark.parametrize("payload", [
    '{"arguments": {"expression": "1"}}',  # no name
    '{"name": "calculator"}',  # no arguments
    '{"name": 3, "arguments": {}}',  # name not a string
    '{"name": "calculator", "arguments": "[1]"}',  # arguments a string, but not of an object
    '["calculator", {"expression": "1"}]',  # not an object
])
def test_parse_malformed_call_is_an_error_entry(payload):
    assert parse_tool_calls(f"<tool_call>{payload}</tool_call>") == [
        {"error": 'error: a tool call is {"name": <string>, "arguments": <object>}'}]


def test_parse_unclosed_last_call():
    text = tool_call("calculator", {"expression": "1"}) + '<tool_call>\n{"name": "calculator", "arguments": {}}'
    assert parse_tool_calls(text) == [{"name": "calculator", "arguments": {"expression": "1"}},
                                      {"name": "calculator", "arguments": {}}]


# --- Calculator -------------------------------------------------------------------------------------------------

def test_tools_schema():
    (tool,) = Calculator.tools
    assert tool["type"] == "function"
    function = tool["function"]
    assert function["name"] == "calculator"
    assert function["description"] == "Evaluate an arithmetic expression (+ - * / // % ** and parentheses) exactly."
    parameters = function["parameters"]
    assert parameters["type"] == "object"
    assert parameters["required"] == ["expression"]
    assert parameters["properties"]["expression"]["type"] == "string"
    json.dumps(Calculator.tools)  # plain JSON, as chat templates need


def test_is_completed():
    env = Calculator()
    state = env.setup_state({"prompt": "q"})
    assert env.is_completed(assistant("48 + 24 = 72.\n#### 72"), state)
    assert not env.is_completed(assistant(tool_call("calculator", {"expression": "48 + 24"})), state)


def test_env_response_answers_each_call():
    env = Calculator()
    state = env.setup_state({"prompt": "q"})
    content = tool_call("calculator", {"expression": "48 + 24"}) + tool_call("calculator", {"expression": "0.1+0.2"})
    assert env.env_response(assistant(content), state) == [
        {"role": "tool", "content": "72"}, {"role": "tool", "content": "0.3"}]
    assert state["calls"] == 2
    env.env_response(assistant(tool_call("calculator", {"expression": "7 // 2"})), state)
    assert state["calls"] == 3


def test_env_response_errors_go_back_to_the_model():
    env = Calculator()
    state = env.setup_state({"prompt": "q"})
    content = "".join([
        tool_call("calculator", {"expression": "1 / 0"}),
        tool_call("calculator", {"expression": "__import__('os').system('ls')"}),
        tool_call("search", {"query": "gsm8k"}),
        tool_call("calculator", {"expr": "1 + 1"}),
    ])
    assert [m["content"] for m in env.env_response(assistant(content), state)] == [
        "error: division by zero",
        "error: unsupported syntax: Call",
        "error: unknown tool search",
        'error: calculator needs {"expression": <string>}',
    ]
    invalid = env.env_response(assistant("<tool_call>\n{not json}\n</tool_call>"), state)
    assert len(invalid) == 1 and invalid[0]["role"] == "tool"
    assert invalid[0]["content"].startswith("error: tool call is not valid JSON")
    assert env.env_response(assistant(tool_call("calculator", {"expression": 12})), state) == [
        {"role": "tool", "content": 'error: calculator needs {"expression": <string>}'}]


def test_env_response_caps_calls_per_turn():
    env = Calculator(max_calls_per_turn=2)
    state = env.setup_state({"prompt": "q"})
    content = "".join(tool_call("calculator", {"expression": f"{i} + 1"}) for i in range(5))
    replies = env.env_response(assistant(content), state)
    assert [m["content"] for m in replies] == ["1", "2", "error: at most 2 tool calls per turn; 3 not answered"]
    assert all(m["role"] == "tool" for m in replies)
    assert state["calls"] == 2


def test_made_by_name_with_kwargs():
    env = make_environment("calculator", {"max_calls_per_turn": 3})
    assert isinstance(env, Calculator) and env.max_calls_per_turn == 3
    with pytest.raises(ValueError, match="max_calls_per_turn"):
        Calculator(max_calls_per_turn=0)
