"""Expert iteration, also called rejection-sampling fine-tuning (docs/algorithms.md section 5).

Each round: sample K responses per prompt from the current policy, score them with a reward, keep
the best one per prompt (`keep="best"`) or every distinct one (`keep="all"`) that reaches
`min_reward`, then fine-tune the policy on the kept set with SFT. The next round samples from the
model this round trained.

    alignjax iterate --config configs/expert_iteration.py:tiny --workdir runs/ei \\
        --config.model.init_from=runs/sft

The workdir holds one folder per round, `round_R/`:
- `samples.jsonl`: the kept records, written by the sampler of `alignjax sample` (while it runs,
  `samples.jsonl.partial` holds every scored sample, so an interrupted round resamples nothing);
- `sft/`: an ordinary SFT training workdir (checkpoints, metrics.jsonl, tb/), resumable;
- `round.json`: written last: the round's numbers.
`expert_iteration.json` lists every finished round. Running the same command again continues
where it stopped; a workdir started from another model is refused.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from alignjax.model.config import ConfigError

KEEP = ("best", "all")
SUMMARY = "expert_iteration.json"


@dataclasses.dataclass(frozen=True)
class Settings:
    rounds: int
    prompts: str
    num_prompts: int
    samples_per_prompt: int
    keep: str
    min_reward: float
    reward: str
    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int
    sample_batch_size: int
    steps_per_round: int
    eval_toy: int


def settings(config) -> Settings:
    """The `expert_iteration` block, checked; a ConfigError names the key."""
    if "expert_iteration" not in config:
        raise ConfigError("the config has no expert_iteration block: start from "
                          "configs/expert_iteration.py")
    e = dict(config.expert_iteration)
    s = Settings(**{f.name: e.get(f.name) for f in dataclasses.fields(Settings)})
    unknown = sorted(set(e) - {f.name for f in dataclasses.fields(Settings)})
    checks = [
        (not unknown, f"expert_iteration.{', '.join(unknown)}: unknown key(s)"),
        (isinstance(s.rounds, int) and s.rounds >= 1, f"expert_iteration.rounds={s.rounds!r}: needs an int >= 1"),
        (isinstance(s.prompts, str) and s.prompts, "expert_iteration.prompts is empty: 'toy' or a file with 'prompt'"),
        (isinstance(s.samples_per_prompt, int) and s.samples_per_prompt >= 1,
         f"expert_iteration.samples_per_prompt={s.samples_per_prompt!r}: needs an int >= 1"),
        (s.keep in KEEP, f"expert_iteration.keep={s.keep!r}: use one of {', '.join(KEEP)}"),
        (isinstance(s.min_reward, (int, float)), f"expert_iteration.min_reward={s.min_reward!r}: a number "
                                                  "(-inf keeps samples whatever they score)"),
        (isinstance(s.reward, str) and s.reward, "expert_iteration.reward is empty: e.g. toy, a reward-model "
                                                 "dir or python:FILE.py:FN"),
        (isinstance(s.steps_per_round, int) and s.steps_per_round >= 1,
         f"expert_iteration.steps_per_round={s.steps_per_round!r}: needs an int >= 1"),
        (isinstance(s.sample_batch_size, int) and s.sample_batch_size >= 1,
         f"expert_iteration.sample_batch_size={s.sample_batch_size!r}: needs an int >= 1"),
        (isinstance(s.eval_toy, int) and s.eval_toy >= 0, f"expert_iteration.eval_toy={s.eval_toy!r}: "
                                                          "held-out toy prompts to score (0 = off)"),
        (isinstance(s.max_new_tokens, int) and s.max_new_tokens >= 1,
         f"expert_iteration.max_new_tokens={s.max_new_tokens!r}: needs an int >= 1"),
        (s.temperature >= 0, f"expert_iteration.temperature={s.temperature!r}: must be >= 0 (0 = greedy)"),
        (0 < s.top_p <= 1, f"expert_iteration.top_p={s.top_p!r}: must be in (0, 1] (1 = off)"),
        (s.top_k >= 0, f"expert_iteration.top_k={s.top_k!r}: must be >= 0 (0 = off)"),
        (bool(config.model.init_from), "model.init_from is empty: expert iteration starts from a model "
                                       "(e.g. an SFT workdir)"),
    ]
    errors = [message for ok, message in checks if not ok]
    if errors:
        raise ConfigError(errors[0] if len(errors) == 1 else "invalid config:\n  - " + "\n  - ".join(errors))
    return s


def round_config(config, model_dir: str, data_path: str, steps: int):
    """The SFT config of one round: the file's SFT settings, starting from `model_dir`, trained
    `steps` steps on `data_path`."""
    c = copy.deepcopy(config)
    with c.unlocked():
        del c["expert_iteration"]
    c.algorithm = "sft"
    c.model.init_from = model_dir
    c.tokenizer.path = ""  # the model's own
    c.data.train = data_path
    c.train.steps = steps
    c.checkpoint.every = min(int(c.checkpoint.every), steps)
    return c


def run(config, workdir: str) -> list[dict]:
    """Runs (or continues) every round; returns one dict per round (and prints a table)."""
    import jax
    from alignjax.errors import UserError, require_writable_dir
    from alignjax.train import registry
    s = settings(config)
    require_writable_dir(workdir, "--workdir")
    start = str(config.model.init_from)
    summary_path = os.path.join(workdir, SUMMARY)
    if os.path.exists(summary_path):
        earlier = json.load(open(summary_path)).get("init_from")
        if earlier != start:
            raise UserError(f"{workdir} holds an expert iteration started from {earlier}, not {start}: "
                            "use a new --workdir (or the same model.init_from to continue)")
    # Check the SFT half before sampling anything.
    registry.validate_config(round_config(config, start, "toy", s.steps_per_round), jax.device_count())
    rows = [_start_row(config, s, start, workdir)]
    _write_summary(summary_path, start, rows)
    model_dir = start
    for r in range(1, s.rounds + 1):
        rdir = os.path.join(workdir, f"round_{r}")
        done = os.path.join(rdir, "round.json")
        if not os.path.exists(done):
            row = _one_round(config, s, r, rdir, model_dir)
            _write_json(done, row)
        rows.append(json.load(open(done)))
        _write_summary(summary_path, start, rows)
        model_dir = os.path.join(rdir, "sft")
    print(format_table(rows))
    print(f"expert iteration: {s.rounds} round(s) in {workdir}; the last model is {model_dir}")
    return rows


def _start_row(config, s: Settings, start: str, workdir: str) -> dict:
    """Round 0: the starting model's held-out toy accuracy (computed once, then read back)."""
    path = os.path.join(workdir, "round_0.json")
    if not os.path.exists(path):
        row = {"round": 0, "model": start}
        if s.eval_toy:
            row["eval_toy_accuracy"] = _toy_accuracy(start, s.eval_toy)
        _write_json(path, row)
    return json.load(open(path))


def _one_round(config, s: Settings, r: int, rdir: str, model_dir: str) -> dict:
    import time
    from alignjax import sampling
    from alignjax import sharding as shd
    from alignjax.errors import UserError
    from alignjax.model.store import load_model
    from alignjax.model.tokenize import load_model_tokenizer
    from alignjax.train import run_training
    os.makedirs(rdir, exist_ok=True)
    samples = os.path.join(rdir, "samples.jsonl")
    clock = time.perf_counter()
    print(f"expert iteration round {r}/{s.rounds}: sampling {s.samples_per_prompt} per prompt from {model_dir}")
    mesh = shd.make_mesh()
    model = load_model(model_dir, mesh, head="lm")
    tokenizer = load_model_tokenizer(model, model_dir)
    prompts = sampling.read_prompts(s.prompts, s.num_prompts)
    report = sampling.sample_dataset(
        model, tokenizer, prompts, sampling.reward_function(s.reward, mesh),
        "best_of_n" if s.keep == "best" else "filtered", s.samples_per_prompt, samples,
        temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_new_tokens=s.max_new_tokens,
        batch_size=s.sample_batch_size, seed=int(config.train.seed) * 1000 + r, min_reward=s.min_reward,
        run_key={"model": model_dir, "reward": s.reward, "prompts": s.prompts})
    del model
    sample_secs = time.perf_counter() - clock
    if not report.records:
        raise UserError(f"round {r}: no sample of {report.prompts} prompts x {s.samples_per_prompt} reached "
                        f"expert_iteration.min_reward={s.min_reward} (mean reward {report.mean_reward:.4f}): "
                        "lower min_reward, raise samples_per_prompt or start from a better model")
    print(f"round {r}: kept {report.records} records from {report.prompts} prompts (mean reward "
          f"{report.mean_reward:.4f}, best-of-{s.samples_per_prompt} {report.best_of_n_reward:.4f}); "
          f"fine-tuning {s.steps_per_round} steps")
    clock = time.perf_counter()
    out = run_training(round_config(config, model_dir, samples, s.steps_per_round), os.path.join(rdir, "sft"))
    row = {"round": r, "model": os.path.join(rdir, "sft"), "prompts": report.prompts,
           "samples": report.samples, "kept": report.records, "mean_reward": report.mean_reward,
           "best_of_n_reward": report.best_of_n_reward, "sample_seconds": round(sample_secs, 1),
           "train_seconds": round(time.perf_counter() - clock, 1),
           "train_loss": out["metrics"].get("loss")}
    if s.eval_toy:
        row["eval_toy_accuracy"] = _toy_accuracy(row["model"], s.eval_toy)
    return row


def _toy_accuracy(model_dir: str, n: int) -> float:
    from alignjax import sharding as shd
    from alignjax.eval.toy import toy_accuracy
    from alignjax.model.store import load_model
    from alignjax.model.tokenize import load_model_tokenizer
    model = load_model(model_dir, shd.make_mesh(), head="lm")
    tokenizer = load_model_tokenizer(model, model_dir)
    return toy_accuracy(model.module, model.params, model.mesh, model.rules, tokenizer, n=n)["accuracy"]


def format_table(rows: list[dict]) -> str:
    cols = [("round", "round", "{}"), ("kept", "kept", "{}"), ("mean_reward", "sample reward", "{:.3f}"),
            ("best_of_n_reward", "best-of-n", "{:.3f}"), ("eval_toy_accuracy", "held-out acc", "{:.1%}")]
    lines = ["  ".join(f"{title:>13}" for _, title, _ in cols)]
    for row in rows:
        lines.append("  ".join(f"{fmt.format(row[key]) if row.get(key) is not None else '-':>13}"
                               for key, _, fmt in cols))
    return "\n".join(lines)


def _write_summary(path: str, start: str, rows: list[dict]) -> None:
    _write_json(path, {"init_from": start, "rounds": rows})


def _write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)
