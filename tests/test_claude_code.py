"""The real Claude Code (npm `@anthropic-ai/claude-code`, pinned in scripts/test.sh, installed into `.venv/node`)
against the server's Anthropic Messages API, on a model whose turns depend on the prompt: asked to write a file,
it calls Claude Code's `Bash` tool; once the command's output is in the prompt, it answers. Claude Code runs the
command itself, so the file on disk, the result it prints and the requests the server saw prove the whole tool
round trip as Claude Code sends it (a ~16k-token prompt with its two dozen tools, system messages amid the
conversation, adaptive thinking, its thinking block sent back with our signature, the key as x-api-key or as a
Bearer token).

Claude Code gets nothing but environment variables, as its users set them for a local server. Every connection
it tries beyond loopback goes to a closed local port through the proxy variables, so it fails at once instead of
waiting on a network.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from harmony_helpers import PromptScriptedModel
from serving import agent_binary, run_agent, serving

from mlx_oss.engine import Engine
from mlx_oss.server import Server

CLAUDE_VERSION = "2.1.332"  # as scripts/test.sh installs it
MODEL = "gpt-oss-20b"
KEY = "local-key"
COMMAND = "printf 'hello from claude' > made.txt && cat made.txt"
ANSWER = "I wrote made.txt: hello from claude."
THOUGHT = "I will write the file with Bash."


def claude_turn(prompt: str) -> str:
    """Claude Code's agent loop, scripted: call Bash until its output is in the prompt, then answer; a side task
    (a title, say, asked without tools) gets a short answer."""
    if "<|start|>functions.Bash to=assistant" in prompt:
        return f"<|channel|>final<|message|>{ANSWER}<|return|>"
    if "type Bash = " not in prompt:
        return "<|channel|>final<|message|>Writing a file<|return|>"
    call = json.dumps({"command": COMMAND, "description": "Write made.txt"})
    return (
        f"<|channel|>analysis<|message|>{THOUGHT}<|end|><|start|>assistant<|channel|>commentary "
        f"to=functions.Bash <|constrain|>json<|message|>{call}<|call|>"
    )


def claude_binary() -> Path:
    return agent_binary("claude", f"@anthropic-ai/claude-code@{CLAUDE_VERSION}")


@pytest.mark.parametrize("key_variable", ["ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN"])  # x-api-key, Bearer
def test_claude_code_runs_a_tool_round_trip(tmp_path, key_variable):
    claude = claude_binary()
    model = PromptScriptedModel(claude_turn)
    seen: list[dict] = []
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    with serving(Server(Engine(model), MODEL, api_key=KEY), seen) as url:
        env = {
            "ANTHROPIC_BASE_URL": url,
            key_variable: KEY,
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "DISABLE_TELEMETRY": "1",
            "DISABLE_AUTOUPDATER": "1",
        }
        prompt = ["-p", "Write 'hello from claude' into made.txt", "--model", MODEL, "--allowedTools", "Bash"]
        done = run_agent([str(claude), *prompt, "--output-format", "json"], work, home, env)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    result = json.loads(done.stdout)
    assert result["is_error"] is False and result["result"] == ANSWER, result
    assert (work / "made.txt").read_text() == "hello from claude"
    turns = [request["body"] for request in seen if request["path"] == "/v1/messages"]
    assert len(turns) >= 2
    first, last = turns[0], turns[-1]
    assert first["stream"] is True and "Bash" in {tool["name"] for tool in first["tools"]}
    assert first["thinking"]["type"] in ("adaptive", "enabled")
    call_turn, result_turn = last["messages"][-2], last["messages"][-1]
    assert [block["type"] for block in call_turn["content"]] == ["thinking", "tool_use"]
    # Claude Code asks for the thinking omitted: its text comes back in our signature, and reaches the model
    assert call_turn["content"][0]["thinking"] in ("", THOUGHT) and call_turn["content"][0]["signature"]
    assert call_turn["content"][1]["input"]["command"] == COMMAND
    (tool_result,) = result_turn["content"]
    assert tool_result["type"] == "tool_result" and "hello from claude" in json.dumps(tool_result["content"])
    # the chain of thought before the pending call and the command's output reached the model
    assert f"<|channel|>analysis<|message|>{THOUGHT}" in model.prompts[-1]
    assert "hello from claude" in model.prompts[-1].rsplit("<|start|>functions.Bash to=assistant", 1)[1]
