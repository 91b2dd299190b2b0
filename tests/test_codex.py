"""The real Codex CLI (npm `@openai/codex`, pinned in scripts/test.sh, installed into `.venv/node`) against the
server, on a model whose turns depend on the prompt: asked to write a file, it calls Codex's `exec_command` tool;
once the command's output is in the prompt, it answers. Codex runs the command itself, so the file on disk, the
answer on stdout and the requests the server saw prove the whole tool round trip, as Codex sends it (a ~17k
character prompt, namespace and hosted tools, reasoning sent back with store false).

Codex gets nothing but a provider entry in its config (and, for the freeform apply_patch test, a model catalog
that says this model takes it, as Codex's own catalog does for OpenAI's models). It runs in its workspace-write
sandbox, whose bundled bubblewrap works in this project's containers; where it cannot (no user namespaces), the
test says so in a warning and runs Codex with `--dangerously-bypass-approvals-and-sandbox`. Every connection
Codex tries beyond loopback (plugin sync, update checks) goes to a closed local port through the proxy variables,
so it fails at once instead of waiting on a network.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import tempfile
import warnings
from pathlib import Path

import pytest
from harmony_helpers import PromptScriptedModel
from serving import agent_binary, run_agent, serving

from mlx_oss.engine import Engine
from mlx_oss.server import Server

CODEX_VERSION = "0.171.0"  # as scripts/test.sh installs it
MODEL = "gpt-oss-20b"
COMMAND = "printf 'hello from codex' > made.txt"
ANSWER = "I wrote made.txt."
CATALOG = Path(__file__).parent / "data" / f"codex_{CODEX_VERSION}_model_catalog.json"


def codex_turn(prompt: str) -> str:
    """Codex's agent loop, scripted: call exec_command until its output is in the prompt, then answer."""
    if "<|start|>functions.exec_command to=assistant" in prompt:
        thought = "<|channel|>analysis<|message|>The file is there.<|end|>"
        return f"{thought}<|start|>assistant<|channel|>final<|message|>{ANSWER}<|return|>"
    call = json.dumps({"cmd": COMMAND})
    return (
        "<|channel|>analysis<|message|>I will write the file.<|end|><|start|>assistant<|channel|>commentary "
        f"to=functions.exec_command <|constrain|>json<|message|>{call}<|call|>"
    )


def codex_binary() -> Path:
    return agent_binary("codex", f"@openai/codex@{CODEX_VERSION}")


@functools.cache
def sandbox_flags(codex: Path) -> tuple[str, ...]:
    """Codex's workspace-write sandbox where its bubblewrap runs here (a probe writes a file through it), else
    no sandbox, with a warning: the test is about the server, not about the container."""
    with tempfile.TemporaryDirectory() as folder:
        env = {"PATH": os.environ["PATH"], "HOME": folder, "CODEX_HOME": folder}
        probe = [str(codex), "sandbox", "-c", 'sandbox_mode="workspace-write"', "--", "sh", "-c", "echo ok > probe"]
        subprocess.run(probe, cwd=folder, env=env, capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
        if Path(folder, "probe").exists():
            return ("--sandbox", "workspace-write")
    warnings.warn("Codex's bubblewrap sandbox cannot run here: Codex runs without its sandbox", stacklevel=1)
    return ("--dangerously-bypass-approvals-and-sandbox",)


def run_codex(tmp_path: Path, turn, *flags: str) -> tuple[subprocess.CompletedProcess, list[dict], PromptScriptedModel]:
    """`codex exec` asked to write made.txt in `tmp_path/work`, against the server on a model that plays `turn`;
    (the finished process, the server's requests, the model)."""
    codex = codex_binary()
    model = PromptScriptedModel(turn)
    seen: list[dict] = []
    home, codex_home, work = tmp_path / "home", tmp_path / "codex-home", tmp_path / "work"
    for folder in (home, codex_home, work):
        folder.mkdir()
    with serving(Server(Engine(model), MODEL), seen) as url:
        (codex_home / "config.toml").write_text(
            f'model = "{MODEL}"\nmodel_provider = "local"\n\n'
            f'[model_providers.local]\nname = "mlx-oss"\nbase_url = "{url}/v1"\nwire_api = "responses"\n'
        )
        command = [str(codex), "exec", "--skip-git-repo-check", *sandbox_flags(codex), *flags]
        done = run_agent(
            [*command, "Write 'hello from codex' into made.txt"], work, home, {"CODEX_HOME": str(codex_home)}
        )
    assert done.returncode == 0, done.stderr[-4000:]
    return done, [request["body"] for request in seen if request["path"] == "/v1/responses"], model


@pytest.mark.parametrize(("effort", "harmony_effort"), [(None, "medium"), ("xhigh", "high"), ("none", "low")])
def test_codex_exec_runs_a_tool_round_trip(tmp_path, effort, harmony_effort):
    # efforts of OpenAI's newer models, which Codex users set: they were a 400
    flags = ["-c", f'model_reasoning_effort="{effort}"'] if effort else []
    done, turns, model = run_codex(tmp_path, codex_turn, *flags)
    assert (tmp_path / "work" / "made.txt").read_text() == "hello from codex", done.stderr[-4000:]
    assert done.stdout.strip().endswith(ANSWER)
    assert len(turns) >= 2
    first, last = turns[0], turns[-1]
    assert first["stream"] is True and first["store"] is False
    assert first["reasoning"].get("effort") == effort and f"Reasoning: {harmony_effort}" in model.prompts[-1]
    assert {tool["type"] for tool in first["tools"]} >= {"function", "namespace", "web_search"}
    kinds = [item.get("type") for item in last["input"]]
    assert kinds[-3:] == ["reasoning", "function_call", "function_call_output"]
    reasoning = last["input"][-3]
    assert reasoning["summary"][0]["text"] == "I will write the file."  # Codex showed and kept our reasoning
    assert "I will write the file." in done.stderr + done.stdout
    # the chain of thought before the pending call reached the model again
    assert "<|channel|>analysis<|message|>I will write the file." in model.prompts[-1]


PATCH = "*** Begin Patch\n*** Add File: made.txt\n+hello from a patch\n*** End Patch\n"


def patch_turn(prompt: str) -> str:
    """Codex's freeform apply_patch, scripted: the patch as the call's content (no JSON), then an answer."""
    if "<|start|>functions.apply_patch to=assistant" in prompt:
        return f"<|channel|>final<|message|>{ANSWER}<|return|>"
    return f"<|channel|>commentary to=functions.apply_patch<|message|>{PATCH}<|call|>"


def test_codex_s_freeform_apply_patch_round_trip(tmp_path):
    """Codex offers apply_patch as a custom tool with a lark grammar to models whose metadata say so (its own
    model catalog format, in tests/data): the call goes back as a custom_tool_call, under that grammar."""
    catalog = CATALOG.read_text()
    done, turns, model = run_codex(tmp_path, patch_turn, "-c", f"model_catalog_json={json.dumps(str(CATALOG))}")
    assert json.loads(catalog)["models"][0]["apply_patch_tool_type"] == "freeform"
    assert (tmp_path / "work" / "made.txt").read_text() == "hello from a patch\n", done.stderr[-4000:]
    assert done.stdout.strip().endswith(ANSWER)
    (patch,) = [tool for tool in turns[0]["tools"] if tool["type"] == "custom"]
    assert patch["name"] == "apply_patch" and patch["format"]["syntax"] == "lark"
    call, output = turns[-1]["input"][-2:]
    assert (call["type"], call["input"], output["type"]) == ("custom_tool_call", PATCH, "custom_tool_call_output")
    assert len(model.prompts) == 2
