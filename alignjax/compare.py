"""`alignjax compare`: many alignment methods from one SFT start on the toy suite, one table.

    alignjax compare --config configs/compare.py:toy --workdir runs/compare --config.start=runs/sft

Every method starts from `compare.start` and gets the same budget of `compare.steps` optimizer
steps (expert iteration: 2 rounds of steps / 2; best-of-n trains nothing). Conditional tokens
(`conditional`): the start model's samples (as many as RSO draws), each prefixed by `<|good|>` when
its reward reaches `compare.conditional_threshold` and `<|bad|>` otherwise, SFT of the start model
with the two tokens added, evaluated conditioned on `<|good|>`. Each then answers the
held-out toy prompts and is scored by the checker (gold), as are the start model's answers:

    method  accuracy  KL to start  mean length  reward-model score  policy samples  seconds

- accuracy: greedy answers judged by the toy checker (best-of-n: the pick of n samples at
  temperature 1.0 by `compare.reward`; with the checker itself as that reward this is pass@n);
- KL: mean over prompts of sum_t log pi(y_t) - log pi_start(y_t) for one response sampled from
  the method's model at temperature 1 (best-of-n: the analytic log n - (n - 1) / n; conditional
  tokens: pi conditioned on `<|good|>`, pi_start on the plain prompt);
- policy samples: responses the method drew from a policy while training (offline methods: 0);
- seconds: wall time of the run that finished the method (a resumed run counts its last part).

Methods are independent runs in WORKDIR/<method>/ (an ordinary training or `alignjax iterate`
workdir under run/, the evaluation in result.json), so an interrupted comparison resumes: finished
methods are read back, an unfinished run resumes from its checkpoint. The table is WORKDIR/
compare.md and compare.json, the picture (accuracy against KL) compare.png. A workdir made from
another start model is refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Sequence

import numpy as np

from alignjax.errors import UserError
from alignjax.model.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Method:
    kind: str                     # train | iterate | rso | conditional | best_of_n
    config: str = ""              # FILE.py:PRESET of the run
    overrides: tuple = ()
    n: int = 0                    # best_of_n: samples per prompt


_DPO = "configs/dpo.py:tiny"
METHODS = {
    "best_of_4": Method("best_of_n", n=4),
    "best_of_16": Method("best_of_n", n=16),
    "expert_iteration": Method("iterate", "configs/expert_iteration.py:tiny"),
    "rso": Method("rso", _DPO, ("dpo.loss_type=sigmoid_norm",)),
    "conditional": Method("conditional", "configs/sft.py:tiny", ("optimizer.lr=3e-4",)),  # expert iteration's
    "dpo": Method("train", _DPO, ("dpo.loss_type=dpo",)),
    "ipo": Method("train", _DPO, ("dpo.loss_type=ipo",)),
    "slic": Method("train", _DPO, ("dpo.loss_type=slic",)),
    "simpo": Method("train", _DPO, ("dpo.loss_type=simpo",)),
    "orpo": Method("train", _DPO, ("dpo.loss_type=orpo",)),
    "rrhf": Method("train", _DPO, ("dpo.loss_type=rrhf",)),
    "pro": Method("train", _DPO, ("dpo.loss_type=pro",)),
    "kto": Method("train", _DPO, ("dpo.loss_type=kto",)),
    "online_dpo": Method("train", "configs/online_dpo.py:tiny"),
    "ppo": Method("train", "configs/ppo.py:tiny"),
    "grpo": Method("train", "configs/grpo.py:tiny"),
    "rloo": Method("train", "configs/grpo.py:tiny", ("grpo.advantage=rloo",)),
    "reinforce_pp": Method("train", "configs/grpo.py:tiny", ("grpo.advantage=reinforce_pp",)),
}
CONDITIONAL_START = "start_with_control_tokens"  # in the method's workdir
ANSWER_TOKENS = 16  # new tokens per toy answer: answers are at most 12 tokens + EOS
BATCH = 256         # sequences per generate call


@dataclasses.dataclass(frozen=True)
class Settings:
    start: str
    methods: tuple
    steps: int
    eval_prompts: int
    reward: str
    reward_model: str
    rso_candidates: int
    rso_prompts: int
    conditional_threshold: float
    overrides: dict


def settings(config) -> Settings:
    c = config.compare
    methods = tuple(m.strip() for m in str(c.methods).split(",") if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    errors = []
    if unknown:
        errors.append(f"compare.methods: unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    if not methods:
        errors.append("compare.methods is empty: a comma-separated list, e.g. dpo,grpo,best_of_4")
    if len(set(methods)) != len(methods):
        errors.append(f"compare.methods={c.methods!r} names a method twice")
    if not str(c.start):
        errors.append("compare.start is empty: the SFT model every method starts from (a model "
                      "directory or training workdir)")
    if not (isinstance(c.steps, int) and c.steps >= 2):
        errors.append(f"compare.steps={c.steps!r}: optimizer steps per method, an int >= 2")
    if not (isinstance(c.eval_prompts, int) and c.eval_prompts >= 1):
        errors.append(f"compare.eval_prompts={c.eval_prompts!r}: held-out toy prompts, an int >= 1")
    extra = sorted(set(c.overrides.keys()) - set(METHODS))
    if extra:
        errors.append(f"compare.overrides.{extra[0]}: not a method; choose from {', '.join(METHODS)}")
    if errors:
        raise ConfigError(errors[0] if len(errors) == 1 else "invalid config:\n  - " + "\n  - ".join(errors))
    overrides = {k: tuple(c.overrides[k]) for k in c.overrides.keys()}
    return Settings(str(c.start), methods, int(c.steps), int(c.eval_prompts), str(c.reward),
                    str(c.reward_model), int(c.rso_candidates), int(c.rso_prompts),
                    float(c.conditional_threshold), overrides)


# ---- running one method ---------------------------------------------------------------------------

def method_config(name: str, s: Settings, workdir: str):
    """The training config of a train/rso/iterate method: its file, the shared budget and start,
    then the user's compare.overrides.<name>."""
    from alignjax.config import load_config
    m = METHODS[name]
    budget = [f"train.steps={s.steps}", f"model.init_from={s.start}", "train.eval_every=0",
              "optimizer.warmup_steps=1", f"checkpoint.every={s.steps}"]
    if m.kind == "iterate":
        budget = [f"model.init_from={s.start}", "expert_iteration.rounds=2", "expert_iteration.eval_toy=0",
                  f"expert_iteration.steps_per_round={s.steps // 2}", "optimizer.warmup_steps=1"]
    if m.kind == "rso":
        budget.append(f"data.train={os.path.join(workdir, 'rso.jsonl')}")
        budget.append("data.eval=")
    if m.kind == "conditional":  # the start model with the control tokens, and its tokenizer
        budget += [f"model.init_from={os.path.join(workdir, CONDITIONAL_START)}", "tokenizer.path=",
                   f"data.train={os.path.join(workdir, 'conditional.jsonl')}", "data.eval="]
    return load_config(m.config, list(m.overrides) + budget + list(s.overrides.get(name, ())))


def run_method(name: str, s: Settings, workdir: str) -> dict:
    """Trains (or resumes) one method; returns {model, policy_samples}."""
    m = METHODS[name]
    run_dir = os.path.join(workdir, "run")
    if m.kind == "best_of_n":
        return {"model": s.start, "policy_samples": 0}
    config = method_config(name, s, workdir)
    if m.kind == "iterate":
        from alignjax.train import expert_iteration
        rows = expert_iteration.run(config, run_dir)
        return {"model": rows[-1]["model"], "policy_samples": sum(r.get("samples", 0) for r in rows)}
    samples = 0
    if m.kind == "rso":
        samples = _rso_data(s, os.path.join(workdir, "rso.jsonl"))
    if m.kind == "conditional":
        samples = _conditional_data(s, workdir)
    from alignjax.train import run_training
    run_training(config, run_dir)
    if config.algorithm in ("ppo", "grpo"):  # train.batch_size responses per step
        samples = s.steps * int(config.train.batch_size)
    elif config.algorithm == "online_dpo":  # two per prompt
        samples = s.steps * 2 * int(config.train.batch_size)
    return {"model": run_dir, "policy_samples": samples}


def _rso_data(s: Settings, out: str) -> int:
    """RSO pairs sampled from the start model (alignjax sample --mode rso); returns samples drawn."""
    if not os.path.exists(out):
        _sample_start(s, "rso", out)
    return s.rso_candidates * s.rso_prompts


def _sample_start(s: Settings, mode: str, out: str, **kwargs) -> None:
    """`compare.rso_candidates` samples for each of `compare.rso_prompts` toy training prompts from
    the start model, scored by `compare.reward`, written as `alignjax sample --mode MODE` does."""
    from alignjax import sampling
    from alignjax.model.store import load_model
    from alignjax.model.tokenize import load_model_tokenizer
    from alignjax import sharding as shd
    mesh = shd.make_mesh()
    model = load_model(s.start, mesh, head="lm")
    tokenizer = load_model_tokenizer(model, s.start)
    prompts = sampling.read_prompts("toy", s.rso_prompts)
    sampling.sample_dataset(model, tokenizer, prompts, sampling.reward_function(s.reward, mesh), mode,
                            s.rso_candidates, out, max_new_tokens=ANSWER_TOKENS, batch_size=BATCH,
                            run_key={"model": s.start, "reward": s.reward}, **kwargs)


def _conditional_data(s: Settings, workdir: str) -> int:
    """Conditional-token data and start model: every sample of the start model, its
    prompt prefixed by the control token its reward earns (ALGORITHMS: conditional tokens), and the
    start model with `<|good|>` / `<|bad|>` added (WORKDIR/start_with_control_tokens). Returns the
    samples drawn."""
    import shutil
    from alignjax.conditional import condition_records, prepare_model_dir
    from alignjax import sharding as shd
    out = os.path.join(workdir, "conditional.jsonl")  # written last: marks the data done
    if not os.path.exists(out):
        samples = os.path.join(workdir, "samples.jsonl")
        if not os.path.exists(samples):
            _sample_start(s, "all", samples)
        with open(samples) as f:
            records = [json.loads(line) for line in f]
        start = os.path.join(workdir, CONDITIONAL_START)
        shutil.rmtree(start, ignore_errors=True)  # an interrupted earlier attempt
        prepare_model_dir(s.start, start, mesh=shd.make_mesh())
        conditioned = condition_records(records, threshold=s.conditional_threshold, score_key="reward")
        with open(out + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in conditioned)
        os.replace(out + ".tmp", out)
    return s.rso_candidates * s.rso_prompts


# ---- evaluation -----------------------------------------------------------------------------------

def evaluate(model_dir: str, s: Settings, best_of: int = 0, condition: str | None = None) -> dict:
    """Held-out accuracy (checker), KL to the start model, mean length, reward-model score of
    greedy answers, or (`best_of` n) of the pick of n samples by the reward. `condition` ("good"):
    a conditional-token model answers prompts prefixed by that token, never emitting a control
    token; the start model is scored on the plain prompts."""
    from alignjax import sharding as shd
    from alignjax.eval.toy import toy_eval_examples
    from alignjax.data import toy
    from alignjax.conditional import generation_setup
    from alignjax.model.generate import Generator, SamplingParams
    from alignjax.model.store import load_model
    from alignjax.model.tokenize import encode_prompts, load_model_tokenizer
    from alignjax.data.tokenizer import stop_token_ids
    mesh = shd.make_mesh()
    model = load_model(model_dir, mesh, head="lm")
    tokenizer = load_model_tokenizer(model, model_dir)
    examples = toy_eval_examples(s.eval_prompts)
    prompts = [e.prompt for e in examples]
    # Plain prompts, or prefixed by the condition's control token; control tokens never generated.
    ids, blocked = generation_setup(tokenizer, prompts, condition, chat=True,
                                    vocab_size=model.config.vocab_size)
    gen = Generator(model.module, mesh, model.rules, eos_ids=stop_token_ids(tokenizer),
                    pad_id=tokenizer.pad_token_id, blocked_ids=blocked)
    if best_of:
        n = best_of
        rows = [i for i in range(len(prompts)) for _ in range(n)]
        texts = gen.generate_texts(model.params, tokenizer, [ids[i] for i in rows],
                                   SamplingParams(max_new_tokens=ANSWER_TOKENS, temperature=1.0, seed=1),
                                   BATCH)
        rewards = np.asarray(_reward(s)([prompts[i] for i in rows], texts), np.float64).reshape(-1, n)
        answers = [texts[i * n + int(np.argmax(r))] for i, r in enumerate(rewards)]
        kl = math.log(n) - (n - 1) / n
    else:
        answers = gen.generate_texts(model.params, tokenizer, ids,
                                     SamplingParams(max_new_tokens=ANSWER_TOKENS, temperature=0.0), BATCH)
        start = load_model(s.start, mesh, head="lm")
        start_ids = (ids if condition is None else
                     encode_prompts(load_model_tokenizer(start, s.start), prompts, chat=True))
        kl = _kl_to_start(gen, model, ids, start, start_ids)
    scores = [toy.check(e, a) for e, a in zip(examples, answers)]
    out = {"accuracy": float(np.mean(scores)), "kl": float(kl),
           "mean_length": float(np.mean([len(tokenizer(a, add_special_tokens=False)["input_ids"])
                                         for a in answers]))}
    if s.reward_model:
        from alignjax.rewards import build_reward
        out["rm_score"] = float(np.mean(build_reward(s.reward_model, mesh=mesh).score(prompts, answers)))
    return out


def _reward(s: Settings):
    from alignjax.sampling import reward_function
    return reward_function(s.reward_model or s.reward)


def _kl_to_start(gen, model, ids, start, start_ids) -> float:
    """Mean over prompts of the sequence log-ratio log pi - log pi_start of one response sampled
    from pi at temperature 1 (an unbiased estimate of KL(pi || pi_start)); pi reads `ids`, pi_start
    the same prompts as `start_ids` (they differ for a conditioned model)."""
    import jax
    from alignjax.model.generate import SamplingParams
    from alignjax.train.rollout import pad_prompts, response_token_stats
    from alignjax import sharding as shd
    n = len(ids)
    # rows split over the devices; one width fits both prompt forms
    rows, width = gen.bucket(n, max(len(x) for x in list(ids) + list(start_ids)))
    query, query_mask = pad_prompts(list(ids) + [ids[-1]] * (rows - n), width, gen.pad_id)
    out = gen.generate_padded(model.params, query, query_mask,
                              SamplingParams(max_new_tokens=ANSWER_TOKENS, temperature=1.0, seed=2))
    query, query_mask = pad_prompts(list(start_ids) + [start_ids[-1]] * (rows - n), width, gen.pad_id)
    batch = dict(query=query, query_mask=query_mask, response=out["tokens"].astype(np.int32),
                 response_mask=out["mask"].astype(np.int32))
    with shd.mesh_context(start.mesh, start.rules):
        ref = jax.jit(lambda p, b: response_token_stats(start.module, p, b, 1.0)[0])(
            start.params, shd.shard_batch(batch, start.mesh, start.rules))
    log_ratio = np.sum((out["logps"] - shd.to_host(ref)) * batch["response_mask"], axis=1)
    return float(np.mean(log_ratio[:n]))


# ---- the comparison -------------------------------------------------------------------------------

def run(config, workdir: str) -> list[dict]:
    from alignjax.errors import require_writable_dir
    s = settings(config)
    require_writable_dir(workdir, "--workdir")
    meta_path = os.path.join(workdir, "compare.json")
    if os.path.exists(meta_path):
        earlier = json.load(open(meta_path)).get("start")
        if earlier != s.start:
            raise UserError(f"{workdir} holds a comparison started from {earlier}, not {s.start}: use a "
                            "new --workdir (or the same compare.start to continue)")
    for name in s.methods:  # every method's config must load before anything runs
        if METHODS[name].kind != "best_of_n":
            method_config(name, s, os.path.join(workdir, name))
    rows = [_result(workdir, "start", lambda: _start_row(s))]
    _write(workdir, s, rows)
    for i, name in enumerate(s.methods, 1):
        print(f"[{i}/{len(s.methods)}] {name}")
        rows.append(_result(workdir, name, lambda name=name: _one(name, s, os.path.join(workdir, name))))
        _write(workdir, s, rows)
    print(format_table(rows))
    print(f"comparison written to {os.path.join(workdir, 'compare.md')} (+ .json, .png)")
    return rows


def _one(name: str, s: Settings, workdir: str) -> dict:
    clock = time.perf_counter()
    trained = run_method(name, s, workdir)
    condition = "good" if METHODS[name].kind == "conditional" else None
    row = {"method": name, **evaluate(trained["model"], s, METHODS[name].n, condition),
           "policy_samples": trained["policy_samples"]}
    if METHODS[name].kind == "best_of_n":
        row["policy_samples"] = METHODS[name].n * s.eval_prompts
    row["seconds"] = round(time.perf_counter() - clock, 1)
    return row


def _start_row(s: Settings) -> dict:
    clock = time.perf_counter()
    row = {"method": "start (SFT)", **evaluate(s.start, s), "policy_samples": 0}
    row["seconds"] = round(time.perf_counter() - clock, 1)
    return row


def _result(workdir: str, name: str, compute) -> dict:
    """A method's row: read back when finished before, else computed and stored."""
    path = os.path.join(workdir, name, "result.json")
    if os.path.exists(path):
        return json.load(open(path))
    row = compute()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(row, f, indent=1)
    os.replace(path + ".tmp", path)
    return row


def format_table(rows: Sequence[dict]) -> str:
    lines = ["| method | held-out accuracy | KL to start | mean length (tokens) | RM score | policy samples | seconds |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        rm = f"{r['rm_score']:.3f}" if r.get("rm_score") is not None else "-"
        lines.append(f"| {r['method']} | {r['accuracy']:.1%} | {r['kl'] + 0.0:.3f} | {r['mean_length']:.1f} | {rm} | "
                     f"{r['policy_samples']:,} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def _write(workdir: str, s: Settings, rows: Sequence[dict]) -> None:
    os.makedirs(workdir, exist_ok=True)
    for name, text in (("compare.json", json.dumps({"start": s.start, "steps": s.steps,
                                                    "eval_prompts": s.eval_prompts, "rows": list(rows)},
                                                   indent=1)),
                       ("compare.md", f"Start: {s.start}; {s.steps} optimizer steps per method; "
                                      f"{s.eval_prompts} held-out toy prompts (checker).\n\n"
                                      + format_table(rows) + "\n")):
        path = os.path.join(workdir, name)
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    plot(rows, os.path.join(workdir, "compare.png"))


def plot(rows: Sequence[dict], out_png: str) -> None:
    """Held-out accuracy against KL to the start model, one labelled point per method."""
    from alignjax.eval.plots import _pyplot
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        ax.scatter(r["kl"], r["accuracy"] * 100, color="tab:red" if r["method"].startswith("start") else "tab:blue")
        ax.annotate(r["method"], (r["kl"], r["accuracy"] * 100), textcoords="offset points", xytext=(4, 3),
                    fontsize=8)
    ax.set_xlabel("KL to the start model (nats per response)")
    ax.set_ylabel("held-out accuracy (%, toy checker)")
    ax.set_title("alignjax compare: one SFT start, matched steps")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png + ".tmp.png", dpi=110)
    plt.close(fig)
    os.replace(out_png + ".tmp.png", out_png)
