"""Rollout samples (WORKDIR/samples/step_N.jsonl) reach TensorBoard's text tab through the
MetricsWriter: each file once, at its step, read back with TensorBoard's own event reader."""

from __future__ import annotations

import json
import time

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from alignjax.train.metrics import MetricsWriter

ROWS = {1: [{"prompt": "What is 2+3?", "response": "5", "score": 1.0},
            {"prompt": "a | b", "response": "line one\nline two", "score": -0.5}],
        3: [{"prompt": "x", "response": "y", "score": 0.25}],
        9: [{"prompt": "left by a killed run", "response": "stale", "score": 0.0}]}


def _texts(tb_dir) -> dict:
    acc = EventAccumulator(str(tb_dir), size_guidance={"tensors": 0})
    acc.Reload()
    if "samples/text_summary" not in acc.Tags()["tensors"]:
        return {}
    out = {}
    for event in acc.Tensors("samples/text_summary"):
        out.setdefault(event.step, []).append(event.tensor_proto.string_val[0].decode())
    return out


def test_samples_go_to_tensorboard_text_once_at_their_step(tmp_path):
    samples = tmp_path / "samples"
    samples.mkdir()
    for step, rows in ROWS.items():
        (samples / f"step_{step}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    writer = MetricsWriter(str(tmp_path), enabled=True)
    for step in (1, 2, 3):  # as the loop: write a logged step, then advance
        writer.write(step, {"loss": 1.0})
        writer.advance()
    writer.close()
    texts = _texts(tmp_path / "tb")
    assert sorted(texts) == [1, 3]  # step 9's file is not reached yet
    first = texts[1][0].splitlines()
    assert first[0] == "| prompt | response | score |"
    assert first[2] == "| What is 2+3? | 5 | 1 |"
    assert first[3] == "| a \\| b | line one<br>line two | -0.5 |"
    assert texts[3][0].splitlines()[2] == "| x | y | 0.25 |"

    # Resumed at step 3: steps 1 and 3 are not sent again; step 9 (rewritten by then) is.
    (samples / "step_9.jsonl").write_text(json.dumps({"prompt": "p9", "response": "r9", "score": 2.0}) + "\n")
    time.sleep(1.1)  # tensorboardX names event files by the second: a new file, as a real resume
    writer = MetricsWriter(str(tmp_path), resume_step=3, enabled=True)
    writer.advance(6)
    writer.close()
    texts = _texts(tmp_path / "tb")
    assert {step: len(t) for step, t in texts.items()} == {1: 1, 3: 1, 9: 1}
    assert texts[9][0].splitlines()[2] == "| p9 | r9 | 2 |"
