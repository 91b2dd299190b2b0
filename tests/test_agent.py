"""The agent loop on scripted models: built-in calls run and answered as harmony renders them, the turn's events,
the step limit, cancelling a running tool, a tool that cannot run, function calls ending the turn, constraints."""

from __future__ import annotations

import threading
import time

import openai_harmony as oh
import pytest
from harmony_helpers import FakeTool, PromptScriptedModel, harmony_tokens

from mlx_oss.agent import STEP_LIMIT, ToolFinished, ToolStarted, run_turn
from mlx_oss.engine import AnswerDelta, ContextLimitError, Done, Engine, ReasoningDelta, SamplingParams, ToolCall
from mlx_oss.grammar import Grammar, TurnConstraints
from mlx_oss.harmony import Conversation, Message, Tool, encoding, render_prompt
from mlx_oss.tools import ToolOutput

CALL = "<|channel|>analysis<|message|>Use python.<|end|><|start|>assistant<|channel|>analysis to=python code<|message|>"
PYTHON_CALL = CALL + "print(2 + 2)<|call|>"
ANSWER = "<|channel|>analysis<|message|>It printed 4.<|end|><|start|>assistant<|channel|>final<|message|>4.<|return|>"
RESULT_HEADER = "<|start|>python to=assistant<|channel|>analysis<|message|>"


def answers_after_a_result(prompt: str) -> str:
    """Calls python until the current turn holds a tool result, then answers."""
    return ANSWER if RESULT_HEADER in prompt.rsplit("<|start|>user", 1)[-1] else PYTHON_CALL


def turn(model, conversation, tools, **options):
    engine = Engine(model)
    return list(run_turn(engine, conversation, tools, SamplingParams(temperature=0), **options))


def python_conversation(*messages: Message, **settings) -> Conversation:
    settings.setdefault("current_date", "2026-12-03")
    return Conversation(list(messages) or [Message.user("2 + 2?")], builtin_tools=("python",), **settings)


def harmony_rendering(messages: list) -> str:
    """openai-harmony's own rendering (its default, auto-dropping config) with python declared its way."""
    system = oh.SystemContent.new().with_reasoning_effort(oh.ReasoningEffort.MEDIUM)
    system = system.with_conversation_start_date("2026-12-03").with_python_tool()
    convo = oh.Conversation.from_messages([oh.Message.from_role_and_content(oh.Role.SYSTEM, system), *messages])
    return encoding().decode(encoding().render_conversation_for_completion(convo, oh.Role.ASSISTANT))


def hm(role, text, channel=None, recipient=None, content_type=None, author=None):
    message = oh.Message.from_author_and_content(oh.Author.new(role, author) if author else oh.Author(role=role), text)
    for value, setter in (
        (channel, "with_channel"),
        (recipient, "with_recipient"),
        (content_type, "with_content_type"),
    ):
        if value:
            message = getattr(message, setter)(value)
    return message


def test_a_python_call_runs_and_the_model_answers_from_its_result():
    model, tool = PromptScriptedModel(answers_after_a_result), FakeTool()
    convo = python_conversation()
    events = turn(model, convo, {"python": tool})

    assert tool.calls == [("python", "print(2 + 2)")]
    kinds = [type(e) for e in events]
    assert ToolCall not in kinds  # a built-in call is announced by ToolStarted; ToolCall means "the client runs it"
    started, finished = kinds.index(ToolStarted), kinds.index(ToolFinished)
    assert kinds[:started] == [ReasoningDelta] * kinds[:started].count(ReasoningDelta) and started > 0
    assert events[started] == ToolStarted("python", "print(2 + 2)")
    assert finished == started + 1 and events[finished].output == ToolOutput("4\n", display="full: 4\n")
    assert events[finished].seconds >= 0
    assert "".join(e.text for e in events if isinstance(e, AnswerDelta)) == "4."
    assert [e for e in events if isinstance(e, Done)] == [events[-1]]  # one Done, for the whole turn
    done = events[-1]
    assert done.stop_reason == "stop"
    added = [
        Message.reasoning("Use python."),
        Message.builtin_call("python", "print(2 + 2)"),
        Message.builtin_result("python", "4\n"),
        Message.reasoning("It printed 4."),
        Message.answer("4."),
    ]
    assert convo.messages == [Message.user("2 + 2?"), *added] and done.messages == added
    assert done.stats.generated_tokens == len(done.tokens) > len(model.script)  # both steps' tokens
    assert done.stats.prompt_tokens > len(render_prompt(python_conversation()))  # both steps' prompts

    # The second step's prompt is harmony's rendering of the turn so far: call and result, reasoning kept.
    step_two = [
        hm(oh.Role.USER, "2 + 2?"),
        hm(oh.Role.ASSISTANT, "Use python.", "analysis"),
        hm(oh.Role.ASSISTANT, "print(2 + 2)", "analysis", "python", "code"),
        hm(oh.Role.TOOL, "4\n", "analysis", "assistant", author="python"),
    ]
    assert model.prompts[-1] == harmony_rendering(step_two)

    # The next user turn: the answered turn's chain of thought, its tool exchange included, goes as harmony drops it.
    convo.messages.append(Message.user("And 3 + 3?"))
    step_three = [
        *step_two,
        hm(oh.Role.ASSISTANT, "It printed 4.", "analysis"),
        hm(oh.Role.ASSISTANT, "4.", "final"),
        hm(oh.Role.USER, "And 3 + 3?"),
    ]
    assert encoding().decode(render_prompt(convo)) == harmony_rendering(step_three)
    events = turn(model, convo, {"python": tool})
    assert events[-1].stop_reason == "stop" and len(tool.calls) == 2
    first_step = model.prompts[-2]
    assert "print(2 + 2)" not in first_step and "Use python." not in first_step and "4." in first_step


def test_the_step_limit_is_told_to_the_model_and_ends_the_turn():
    model, tool = PromptScriptedModel(lambda prompt: PYTHON_CALL), FakeTool()
    convo = python_conversation()
    events = turn(model, convo, {"python": tool}, max_steps=2)
    assert len(tool.calls) == 2  # the third and fourth calls are not run
    assert events[-1].stop_reason == STEP_LIMIT
    results = [m for m in convo.messages if m.role == "tool"]
    assert len(results) == 4 and all("limit of 2 tool calls" in m.content for m in results[2:])
    assert "limit of 2 tool calls" in model.prompts[-1]  # told before its last step
    assert convo.messages[-1] == results[-1]  # every call has its result: the conversation stays well formed
    limited = [e for e in events if isinstance(e, ToolFinished)][2:]
    assert all(e.output.error for e in limited)


def test_told_the_limit_the_model_answers_and_the_turn_ends_well():
    model = PromptScriptedModel(lambda prompt: ANSWER if "limit of 1 tool calls" in prompt else PYTHON_CALL)
    convo, tool = python_conversation(), FakeTool()
    events = turn(model, convo, {"python": tool}, max_steps=1)
    assert events[-1].stop_reason == "stop" and len(tool.calls) == 1 and convo.messages[-1] == Message.answer("4.")


def test_cancel_during_a_tool_run_reaches_the_tool_and_ends_the_turn():
    model, tool = PromptScriptedModel(answers_after_a_result), FakeTool(wait_for_cancel=True)
    convo = python_conversation()
    from mlx_oss.cancel import CancelToken

    cancel = CancelToken()
    canceller = threading.Thread(target=lambda: tool.running.wait(30) and cancel.cancel())
    canceller.start()
    events = list(run_turn(Engine(model), convo, {"python": tool}, cancel=cancel))
    canceller.join()
    assert tool.saw_cancel  # the token was handed to run() and woke it
    assert events[-1].stop_reason == "cancelled"
    assert isinstance(events[-2], ToolFinished) and events[-2].output.text == "KeyboardInterrupt"
    assert convo.messages[-1] == Message.builtin_result("python", "KeyboardInterrupt")
    assert len(model.prompts) == 1  # no step after the cancel


def test_cancel_during_generation_keeps_what_was_said():
    from mlx_oss.cancel import CancelToken

    model = PromptScriptedModel(lambda prompt: CALL + "x = 1\n" * 200 + "<|call|>", step_delay=0.002)
    cancel, convo, tool = CancelToken(), python_conversation(), FakeTool()
    events = []
    for event in run_turn(Engine(model), convo, {"python": tool}, cancel=cancel):
        events.append(event)
        if isinstance(event, ReasoningDelta):
            cancel.cancel()
    assert events[-1].stop_reason == "cancelled" and tool.calls == []
    assert convo.messages[1].channel == "analysis" and convo.messages == [convo.messages[0], *events[-1].messages]


def test_a_call_cancelled_as_it_is_written_is_answered_and_not_run():
    from mlx_oss.cancel import CancelToken

    model = PromptScriptedModel(lambda prompt: CALL + "x = 1\n" * 200 + "<|call|>", step_delay=0.002)
    cancel, convo, tool = CancelToken(), python_conversation(), FakeTool()
    written = len(harmony_tokens(CALL)) + 20  # decode steps until the call's code is being written

    def cancel_mid_call():
        while model.forward_calls < written:
            time.sleep(0.001)
        cancel.cancel()

    canceller = threading.Thread(target=cancel_mid_call)
    canceller.start()
    list(run_turn(Engine(model), convo, {"python": tool}, cancel=cancel))
    canceller.join()
    call, result = convo.messages[-2:]
    assert call.recipient == "python" and call.content.startswith("x = 1") and tool.calls == []
    assert result == Message.builtin_result("python", "The user stopped this call before it ran.")


@pytest.mark.parametrize(
    ("tools", "told"),
    [
        ({"python": FakeTool(unavailable="no sandbox on this computer")}, "no sandbox on this computer"),
        ({}, "it is not enabled in this conversation"),
    ],
)
def test_a_tool_that_cannot_run_is_told_to_the_model_which_goes_on(tools, told):
    model = PromptScriptedModel(answers_after_a_result)
    convo = python_conversation()
    events = turn(model, convo, tools)
    assert events[-1].stop_reason == "stop"
    result = next(m for m in convo.messages if m.role == "tool")
    assert result.content == f"The python tool is unavailable: {told}. Go on without it." and result.author == "python"
    assert all(not t.calls for t in tools.values())
    finished = next(e for e in events if isinstance(e, ToolFinished))
    assert finished.output.error and finished.output.display == f"python is unavailable: {told}"


def test_a_function_call_still_ends_the_turn():
    weather = Tool("get_weather", "Weather.", {"type": "object", "properties": {"city": {"type": "string"}}})
    call = '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris"}<|call|>'
    model, tool = PromptScriptedModel(lambda prompt: call), FakeTool()
    convo = python_conversation(Message.user("Weather in Paris?"), tools=[weather])
    events = turn(model, convo, {"python": tool})
    assert ToolCall("functions.get_weather", '{"city":"Paris"}', "commentary", "<|constrain|>json") in events
    assert not any(isinstance(e, ToolStarted) for e in events) and tool.calls == []
    assert events[-1].stop_reason == "tool_call" and convo.messages[-1].recipient == "functions.get_weather"


def test_constraints_let_the_builtin_call_through_and_hold_the_answer():
    model, tool = PromptScriptedModel(answers_after_a_result), FakeTool()
    convo = python_conversation()
    constraints = TurnConstraints(answer=Grammar("regex", r"\d+\."))
    events = turn(model, convo, {"python": tool}, constraints=constraints)
    assert tool.calls == [("python", "print(2 + 2)")] and events[-1].stop_reason == "stop"
    assert convo.messages[-1] == Message.answer("4.")


def test_a_result_that_overflows_the_context_ends_the_turn():
    model, tool = PromptScriptedModel(answers_after_a_result), FakeTool(output="word " * 400)
    convo = python_conversation()
    engine = Engine(model, context_length=len(render_prompt(convo)) + 100)
    events = list(run_turn(engine, convo, {"python": tool}))
    assert events[-1].stop_reason == "context_limit" and convo.messages[-1].role == "tool"
    with pytest.raises(ContextLimitError):  # a first prompt that does not fit raises, as Engine.respond does
        list(run_turn(engine, convo, {"python": tool}))
