"""The built-in ``code`` task: function-writing problems with assert tests, written for rlfleet.

Each problem asks for one function; a record has a ``prompt`` (one user message) and ``tests`` (asserts that call
the function), scored by :func:`rlfleet.rewards.code_tests_reward` in the sandbox. ``reference`` solutions are kept
here, not in the records: tests/test_sandbox.py runs each through the sandbox (it must pass) together with a stub
that returns None (it must fail). Both splits hold the same problems in different orders: this is a small task for
checking a code-reward job end to end, not a benchmark.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

INSTRUCTION = "Reply with the code in a ```python block."


@dataclass(frozen=True)
class CodeProblem:
    signature: str  # e.g. "add(a, b)"
    task: str  # what it returns, completing "Write a Python function `signature` that ..."
    reference: str
    tests: str

    @property
    def name(self) -> str:
        return self.signature.split("(")[0]

    @property
    def prompt(self) -> str:
        return f"Write a Python function `{self.signature}` that {self.task} {INSTRUCTION}"


PROBLEMS: tuple[CodeProblem, ...] = (
    CodeProblem("add(a, b)", "returns the sum of a and b.",
                "def add(a, b):\n    return a + b\n",
                "assert add(1, 2) == 3\nassert add(-4, 4) == 0\nassert add(2.5, 0.5) == 3.0\n"),
    CodeProblem("is_even(n)", "returns True when the integer n is even, else False.",
                "def is_even(n):\n    return n % 2 == 0\n",
                "assert is_even(4) is True\nassert is_even(7) is False\nassert is_even(0) is True\n"
                "assert is_even(-3) is False\n"),
    CodeProblem("reverse_string(s)", "returns the string s reversed.",
                "def reverse_string(s):\n    return s[::-1]\n",
                "assert reverse_string('abc') == 'cba'\nassert reverse_string('') == ''\n"
                "assert reverse_string('ab ba!') == '!ab ba'\n"),
    CodeProblem("factorial(n)", "returns n! for an integer n >= 0 (0! is 1).",
                "def factorial(n):\n    out = 1\n    for k in range(2, n + 1):\n        out *= k\n    return out\n",
                "assert factorial(0) == 1\nassert factorial(1) == 1\nassert factorial(5) == 120\n"
                "assert factorial(10) == 3628800\n"),
    CodeProblem("fibonacci(n)", "returns the n-th Fibonacci number, with fibonacci(0) == 0 and fibonacci(1) == 1.",
                "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
                "assert fibonacci(0) == 0\nassert fibonacci(1) == 1\nassert fibonacci(2) == 1\n"
                "assert fibonacci(10) == 55\nassert fibonacci(30) == 832040\n"),
    CodeProblem("is_palindrome(s)", "returns True when s reads the same backwards, ignoring case and any character "
                "that is not a letter or digit.",
                "def is_palindrome(s):\n    t = [c.lower() for c in s if c.isalnum()]\n    return t == t[::-1]\n",
                "assert is_palindrome('A man, a plan, a canal: Panama') is True\nassert is_palindrome('abc') is False\n"
                "assert is_palindrome('') is True\nassert is_palindrome('No lemon, no melon') is True\n"),
    CodeProblem("count_vowels(s)", "returns how many of the characters of s are vowels (a, e, i, o, u, either case).",
                "def count_vowels(s):\n    return sum(c in 'aeiouAEIOU' for c in s)\n",
                "assert count_vowels('hello') == 2\nassert count_vowels('RHYTHM') == 0\n"
                "assert count_vowels('AEIOU aeiou') == 10\nassert count_vowels('') == 0\n"),
    CodeProblem("max_of_list(xs)", "returns the largest number in the list xs, or None when xs is empty.",
                "def max_of_list(xs):\n    return max(xs) if xs else None\n",
                "assert max_of_list([3, 9, 2]) == 9\nassert max_of_list([-5, -2, -8]) == -2\n"
                "assert max_of_list([]) is None\nassert max_of_list([7]) == 7\n"),
    CodeProblem("sum_of_digits(n)", "returns the sum of the decimal digits of the integer n >= 0.",
                "def sum_of_digits(n):\n    return sum(int(d) for d in str(n))\n",
                "assert sum_of_digits(0) == 0\nassert sum_of_digits(123) == 6\nassert sum_of_digits(9999) == 36\n"
                "assert sum_of_digits(1000001) == 2\n"),
    CodeProblem("is_prime(n)", "returns True when the integer n is a prime number, else False.",
                "def is_prime(n):\n    if n < 2:\n        return False\n    k = 2\n    while k * k <= n:\n"
                "        if n % k == 0:\n            return False\n        k += 1\n    return True\n",
                "assert is_prime(2) is True\nassert is_prime(1) is False\nassert is_prime(97) is True\n"
                "assert is_prime(91) is False\nassert is_prime(-7) is False\n"),
    CodeProblem("gcd(a, b)", "returns the greatest common divisor of the positive integers a and b.",
                "def gcd(a, b):\n    while b:\n        a, b = b, a % b\n    return a\n",
                "assert gcd(12, 18) == 6\nassert gcd(17, 5) == 1\nassert gcd(100, 10) == 10\nassert gcd(7, 7) == 7\n"),
    CodeProblem("flatten(xss)", "returns one list holding the elements of the lists in xss, in order.",
                "def flatten(xss):\n    return [x for xs in xss for x in xs]\n",
                "assert flatten([[1, 2], [3], []]) == [1, 2, 3]\nassert flatten([]) == []\n"
                "assert flatten([['a'], ['b', 'c']]) == ['a', 'b', 'c']\n"),
    CodeProblem("unique_sorted(xs)", "returns the distinct values of the list xs in increasing order, as a list.",
                "def unique_sorted(xs):\n    return sorted(set(xs))\n",
                "assert unique_sorted([3, 1, 3, 2, 1]) == [1, 2, 3]\nassert unique_sorted([]) == []\n"
                "assert unique_sorted([5, 5, 5]) == [5]\n"),
    CodeProblem("word_count(s)", "returns the number of words in s, where words are separated by whitespace.",
                "def word_count(s):\n    return len(s.split())\n",
                "assert word_count('the quick brown fox') == 4\nassert word_count('') == 0\n"
                "assert word_count('  spaced   out  ') == 2\nassert word_count('one\\ntwo\\tthree') == 3\n"),
    CodeProblem("celsius_to_fahrenheit(c)", "converts a temperature from degrees Celsius to degrees Fahrenheit.",
                "def celsius_to_fahrenheit(c):\n    return c * 9 / 5 + 32\n",
                "assert celsius_to_fahrenheit(0) == 32\nassert celsius_to_fahrenheit(100) == 212\n"
                "assert celsius_to_fahrenheit(-40) == -40\nassert abs(celsius_to_fahrenheit(37) - 98.6) < 1e-9\n"),
    CodeProblem("second_largest(xs)", "returns the second largest distinct value in the list xs, or None when xs "
                "has fewer than two distinct values.",
                "def second_largest(xs):\n    values = sorted(set(xs))\n    return values[-2] if len(values) >= 2 "
                "else None\n",
                "assert second_largest([4, 1, 7, 3]) == 4\nassert second_largest([5, 5, 2]) == 2\n"
                "assert second_largest([9, 9]) is None\nassert second_largest([]) is None\n"),
    CodeProblem("capitalize_words(s)", "returns s with the first letter of every space-separated word in upper case "
                "and the other letters unchanged.",
                "def capitalize_words(s):\n    return ' '.join(w[:1].upper() + w[1:] for w in s.split(' '))\n",
                "assert capitalize_words('hello world') == 'Hello World'\nassert capitalize_words('') == ''\n"
                "assert capitalize_words('mIxed caSe') == 'MIxed CaSe'\n"),
    CodeProblem("running_sum(xs)", "returns the list of running totals of xs: element i is xs[0] + ... + xs[i].",
                "def running_sum(xs):\n    out, total = [], 0\n    for x in xs:\n        total += x\n"
                "        out.append(total)\n    return out\n",
                "assert running_sum([1, 2, 3, 4]) == [1, 3, 6, 10]\nassert running_sum([]) == []\n"
                "assert running_sum([5, -5, 5]) == [5, 0, 5]\n"),
    CodeProblem("char_frequency(s)", "returns a dict from each character of s to the number of times it occurs.",
                "def char_frequency(s):\n    out = {}\n    for c in s:\n        out[c] = out.get(c, 0) + 1\n"
                "    return out\n",
                "assert char_frequency('aab') == {'a': 2, 'b': 1}\nassert char_frequency('') == {}\n"
                "assert char_frequency('a a') == {'a': 2, ' ': 1}\n"),
    CodeProblem("merge_sorted(a, b)", "returns one sorted list holding the elements of the sorted lists a and b.",
                "def merge_sorted(a, b):\n    return sorted(a + b)\n",
                "assert merge_sorted([1, 4, 6], [2, 3, 7]) == [1, 2, 3, 4, 6, 7]\nassert merge_sorted([], [1]) == [1]\n"
                "assert merge_sorted([2, 2], [2]) == [2, 2, 2]\nassert merge_sorted([], []) == []\n"),
    CodeProblem("binary_to_int(s)", "returns the integer written in binary by the string s of 0s and 1s.",
                "def binary_to_int(s):\n    return int(s, 2)\n",
                "assert binary_to_int('0') == 0\nassert binary_to_int('101') == 5\n"
                "assert binary_to_int('11111111') == 255\nassert binary_to_int('0010') == 2\n"),
    CodeProblem("rotate_left(xs, k)", "returns the list xs rotated left by k positions (k >= 0, possibly larger than "
                "the list); an empty list stays empty.",
                "def rotate_left(xs, k):\n    if not xs:\n        return []\n    k %= len(xs)\n"
                "    return xs[k:] + xs[:k]\n",
                "assert rotate_left([1, 2, 3, 4], 1) == [2, 3, 4, 1]\nassert rotate_left([1, 2, 3], 3) == [1, 2, 3]\n"
                "assert rotate_left([1, 2, 3], 5) == [3, 1, 2]\nassert rotate_left([], 2) == []\n"),
    CodeProblem("chunk(xs, n)", "splits the list xs into consecutive lists of n elements (the last one may be "
                "shorter) and returns the list of them.",
                "def chunk(xs, n):\n    return [xs[i:i + n] for i in range(0, len(xs), n)]\n",
                "assert chunk([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4], [5]]\nassert chunk([], 3) == []\n"
                "assert chunk([1, 2, 3], 3) == [[1, 2, 3]]\n"),
    CodeProblem("are_anagrams(a, b)", "returns True when the strings a and b use the same letters the same number "
                "of times, ignoring case and spaces.",
                "def are_anagrams(a, b):\n    norm = lambda s: sorted(s.replace(' ', '').lower())\n"
                "    return norm(a) == norm(b)\n",
                "assert are_anagrams('Listen', 'Silent') is True\nassert are_anagrams('dormitory', 'dirty room') is True\n"
                "assert are_anagrams('abc', 'abd') is False\nassert are_anagrams('aab', 'ab') is False\n"),
    CodeProblem("fizzbuzz(n)", "returns the list of strings for 1..n where multiples of 3 are 'Fizz', of 5 'Buzz', "
                "of both 'FizzBuzz', and other numbers their digits.",
                "def fizzbuzz(n):\n    out = []\n    for i in range(1, n + 1):\n"
                "        out.append('Fizz' * (i % 3 == 0) + 'Buzz' * (i % 5 == 0) or str(i))\n    return out\n",
                "assert fizzbuzz(5) == ['1', '2', 'Fizz', '4', 'Buzz']\nassert fizzbuzz(15)[-1] == 'FizzBuzz'\n"
                "assert fizzbuzz(0) == []\nassert len(fizzbuzz(30)) == 30\n"),
)


def code_rows(rng: random.Random, size: int) -> list[dict]:
    """``size`` records (prompt, tests): the problems in rounds, each round in ``rng``'s order."""
    rows = []
    while len(rows) < size:
        for problem in rng.sample(PROBLEMS, len(PROBLEMS)):
            rows.append({"prompt": [{"role": "user", "content": problem.prompt}], "tests": problem.tests})
    return rows[:size]
