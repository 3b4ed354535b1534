"""The engine's health figures: `failed_steps` counts steps whose every forward failed and is
reset by a good step; a request that fails alone (the others of its step succeed) is no failed
step; `last_ok_step_s` moves only when a step ends well."""

from __future__ import annotations

import time

from flora.engine import Engine, EngineConfig, Request
from tests.flora.engine.reference import random_prompts, tiny_decoder


def _broken(*args, **kwargs):
    raise RuntimeError("injected: the device is gone")


def test_failed_steps_count_steps_whose_every_forward_failed_and_a_good_step_resets_them():
    engine = Engine(tiny_decoder("gpt_bigcode").eval(), config=EngineConfig(max_batch_rows=4))
    prompts = random_prompts([5, 7, 6])
    (ok,) = engine.generate([Request(prompts[0], max_new_tokens=3, ignore_eos=True)])
    assert ok.finish_reason == "length" and engine.failed_steps == 0
    healthy_at = engine.last_ok_step_s

    forward = engine.runner.forward
    engine.runner.forward = _broken  # a sticky fault: every forward fails, each row alone too
    for i in range(3):
        handles = [engine.add_request(Request(p, max_new_tokens=3, ignore_eos=True)) for p in prompts]
        while not all(h.done for h in handles):
            ok_at, failed = engine.last_ok_step_s, engine.failed_steps
            engine.step()
            if engine.failed_steps > failed:
                assert engine.last_ok_step_s == ok_at  # a failed step is no sign of health
        assert [h.result().finish_reason for h in handles] == ["error"] * 3
        assert engine.failed_steps == i + 1  # one step per round: the batch, then each row alone, all failed
        assert not engine.step()  # an idle step between requests: the count stands (one request at a time adds up)
    assert engine.failed_steps == 3
    failed_at = engine.last_ok_step_s

    engine.runner.forward = forward
    time.sleep(0.01)
    (ok,) = engine.generate([Request(prompts[1], max_new_tokens=2, ignore_eos=True)])
    assert ok.finish_reason == "length"
    assert engine.failed_steps == 0 and engine.last_ok_step_s > failed_at >= healthy_at
    engine.close()


def test_a_request_that_fails_alone_is_not_a_failed_step():
    engine = Engine(tiny_decoder("gpt_bigcode").eval(), config=EngineConfig(max_batch_rows=4))
    prompts = random_prompts([5, 7, 6])
    poison = len(prompts[1])
    forward = engine.runner.forward

    def fails_with_the_poisoned_prompt(inputs):
        # The batch forward (all three prompts) and the poisoned prompt alone fail; the others alone run.
        if len(inputs.sample_rows) == 3 or inputs.num_tokens == poison:
            raise RuntimeError("injected: this request's input breaks the kernel")
        return forward(inputs)

    engine.runner.forward = fails_with_the_poisoned_prompt
    outs = engine.generate([Request(p, max_new_tokens=1, ignore_eos=True) for p in prompts])
    assert [o.finish_reason for o in outs] == ["length", "error", "length"]
    assert engine.failed_steps == 0
    engine.close()

