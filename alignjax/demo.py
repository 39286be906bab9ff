"""`make demo`: the end-to-end pipeline on the built-in toy suite, on the CPU, in minutes.

    1. SFT of a small Llama from scratch on the toy instructions (progress bar, metrics.jsonl, tb/)
    2. checker accuracy of greedy answers on held-out prompts, before and after, with samples
    3. a reward model (Bradley-Terry) from the SFT model on the toy preference pairs
    4. DPO from the SFT model on the same pairs: implicit-reward accuracy, checker accuracy, and
       generation-based eval during training (eval/win_rate_vs_start against the SFT answers)
    5. PPO from the SFT model with the reward model as the reward (RLHF): the reward model's score
       of the rollouts beside the checker's accuracy, which the reward model only approximates
    6. win rates of DPO and of PPO against SFT, judged by the checker, the reward model and a small
       LLM judge trained here on toy judge prompts (both orders); curves under each run's plots/
    7. export to Hugging Face format and generation / scoring with transformers

Every stage writes to WORKDIR so the results can be inspected (and TensorBoard pointed at it).
Running it again reuses the stages that finished (their checkpoints and metrics.jsonl) and
prints the same results table; delete WORKDIR to start from scratch.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

# PPO against the reward model: 50 of the tiny preset's 100 steps (about two minutes on two CPU
# cores), the reward model's scores standardised by its own statistics and a 2x lower learning
# rate than the checker-reward preset's. With the preset as it is (raw scores, lr 1e-4) the policy
# ran to KL 11.6 within 10 steps and the checker's accuracy fell from 86.5% to 40% (see README).
PPO_OVERRIDES = ("train.steps=50", "ppo.reward_normalize=True", "optimizer.lr=5e-5")


def _banner(text: str):
    print("\n" + "=" * 78 + f"\n{text}\n" + "=" * 78, flush=True)


def _show_samples(samples):
    for prompt, answer, ok in samples:
        print(f"  [{'ok' if ok else '--'}] {prompt!r:44} -> {answer!r}")


def _finished(workdir: str, config) -> dict | None:
    """The final metrics of a run in ``workdir`` that already reached ``train.steps``, else None.

    A finished stage is reused, not "resumed" (resuming a finished run trains no step and so
    returns no metrics): its metrics.jsonl rows are merged in order, as the training loop does.
    """
    from alignjax.train.metrics import read_metrics
    steps = int(config.train.steps)
    if not os.path.isdir(os.path.join(workdir, "checkpoints", str(steps))):
        return None
    try:
        rows = read_metrics(workdir)
    except (OSError, ValueError):
        return None
    if not rows or rows[-1].get("step") != steps:
        return None
    merged = {}
    for row in rows:
        merged.update(row)
    return merged


def _stage(name: str, config, workdir: str, reused: list, run_=None):
    """(final metrics, params) of one training stage: a finished run is read back, else trained.

    Params are returned only when ``run_`` (the SFT Run, whose mesh and rules they go on) is given.
    """
    from alignjax.train import run_training
    metrics = _finished(workdir, config)
    if metrics is None:
        out = run_training(config, workdir)
        return out["metrics"], out["state"]["params"]["policy"]
    reused.append(name)
    print(f"{name}: reusing the finished run in {workdir} ({int(config.train.steps)} steps; "
          f"delete it to train again)")
    if run_ is None:
        return metrics, None
    from alignjax.model.store import load_model
    return metrics, load_model(workdir, run_.mesh, run_.rules).params


def run(workdir: str, sft_steps: int | None = None, eval_n: int = 200) -> dict:
    import jax
    from alignjax.config import load_config
    from alignjax.eval.toy import toy_accuracy
    from alignjax.train.setup import build_run, initial_params

    start = time.time()
    results, reused = {}, []
    sft_dir = os.path.join(workdir, "sft")
    overrides = [f"train.steps={sft_steps}"] if sft_steps else []
    config = load_config("configs/sft.py:tiny", overrides)

    _banner("1/7  SFT of a tiny Llama on the toy instruction suite (from scratch)")
    run_ = build_run(config, sft_dir)
    print(f"model: {run_.model_config.num_params():,} parameters, vocab {len(run_.tokenizer)}, "
          f"mesh {dict(run_.mesh.shape)} over {jax.device_count()} devices")
    before = toy_accuracy(run_.module, initial_params(config, run_),
                          run_.mesh, run_.rules, run_.tokenizer, n=eval_n)
    print(f"checker accuracy before SFT (random weights): {before['accuracy']:.1%}")
    _, sft_params = _stage("SFT", config, sft_dir, reused, run_)

    _banner("2/7  Held-out checker accuracy of greedy answers")
    after = toy_accuracy(run_.module, sft_params, run_.mesh, run_.rules, run_.tokenizer, n=eval_n)
    print(f"before SFT: {before['accuracy']:.1%}   after SFT: {after['accuracy']:.1%}   "
          f"(by task: {', '.join(f'{k} {v:.0%}' for k, v in after['by_task'].items())})")
    _show_samples(after["samples"])
    results["sft"] = {"before": before["accuracy"], "after": after["accuracy"],
                      "params": run_.model_config.num_params(), "steps": int(config.train.steps)}

    _banner("3/7  Reward model (Bradley-Terry) from the SFT model on toy preference pairs")
    rm_dir = os.path.join(workdir, "reward")
    from_sft = [f"model.init_from={sft_dir}", "tokenizer.path="]
    rm_cfg = load_config("configs/reward.py:tiny", from_sft)
    rm, _ = _stage("reward model", rm_cfg, rm_dir, reused)
    print(f"reward model: held-out pairwise accuracy {rm['eval/accuracy']:.1%} "
          f"(margin {rm['eval/margin']:.2f})")
    results["reward"] = {"accuracy": rm["eval/accuracy"], "steps": int(rm_cfg.train.steps),
                         "batch_size": int(rm_cfg.train.batch_size)}

    _banner("4/7  DPO from the SFT model on the same pairs")
    dpo_dir = os.path.join(workdir, "dpo")
    dpo_cfg = load_config("configs/dpo.py:tiny", from_sft + [
        "train.eval_generate_every=50", "train.eval_reward=toy", "train.eval_generate_num=64"])
    print(f"loss: {dpo_cfg.dpo.loss_type}, beta {dpo_cfg.dpo.beta}, reference {dpo_cfg.dpo.reference}")
    dpo, dpo_params = _stage("DPO", dpo_cfg, dpo_dir, reused, run_)
    dpo_acc = toy_accuracy(run_.module, dpo_params, run_.mesh, run_.rules, run_.tokenizer, n=eval_n)
    print(f"implicit-reward accuracy on held-out pairs: {dpo['eval/rewards/accuracies']:.1%}")
    print(f"checker accuracy of greedy answers: SFT {after['accuracy']:.1%} -> DPO {dpo_acc['accuracy']:.1%}")
    _show_samples(dpo_acc["samples"])
    results["dpo"] = {"implicit_accuracy": dpo["eval/rewards/accuracies"],
                      "checker_accuracy": dpo_acc["accuracy"], "loss": dpo_cfg.dpo.loss_type,
                      "beta": float(dpo_cfg.dpo.beta), "steps": int(dpo_cfg.train.steps)}

    _banner("5/7  PPO from the SFT model, the reward model as the reward (RLHF)")
    ppo_dir = os.path.join(workdir, "ppo")
    ppo_cfg = load_config("configs/ppo.py:tiny", [
        f"model.init_from={sft_dir}", f"ppo.reward={rm_dir}", *PPO_OVERRIDES, "train.eval_every=0", "train.eval_generate_every=25", "train.eval_reward=toy",
        "train.eval_generate_num=64"])
    print(f"policy and value from the SFT and reward models; {int(ppo_cfg.train.batch_size)} "
          f"rollouts a step, kl_coef {ppo_cfg.ppo.kl_coef}; the checker is only watched (eval/reward_mean)")
    _stage("PPO", ppo_cfg, ppo_dir, reused)
    from alignjax.model.store import load_model
    ppo_params = load_model(ppo_dir, run_.mesh, run_.rules).params
    ppo_acc = toy_accuracy(run_.module, ppo_params, run_.mesh, run_.rules, run_.tokenizer, n=eval_n)
    results["ppo"] = dict(_ppo_summary(ppo_dir), checker_accuracy=ppo_acc["accuracy"],
                          steps=int(ppo_cfg.train.steps), batch_size=int(ppo_cfg.train.batch_size),
                          standardised=bool(ppo_cfg.ppo.reward_normalize))
    r = results["ppo"]
    print(f"reward-model score of the rollouts: {r['score_first']:+.3f} (first {r['window']} steps) -> "
          f"{r['score_last']:+.3f} (last {r['window']}); KL to the SFT model {r['kl_last']:.3f}")
    print(f"checker accuracy of greedy answers: SFT {after['accuracy']:.1%} -> PPO {ppo_acc['accuracy']:.1%}")
    if r["score_last"] > r["score_first"] and ppo_acc["accuracy"] < after["accuracy"]:
        print("the reward model's score rose while the checker's accuracy fell: reward hacking (the "
              "reward model is a learned, imperfect proxy for the checker)")
    _show_samples(ppo_acc["samples"])

    _banner("6/7  Win rates of DPO and PPO against SFT: the checker, the reward model, a small LLM judge")
    results["winrates"] = _winrates(workdir, sft_dir, {"DPO": dpo_dir, "PPO": ppo_dir}, rm_dir, reused,
                                    eval_n)

    _banner("7/7  Export to Hugging Face; generate and score with transformers")
    for name in ("hf_dpo", "hf_reward"):  # the demo's own exports: redone from the runs each time
        shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)
    results["hf_generation_matches"] = _export_and_generate(dpo_dir, os.path.join(workdir, "hf_dpo"),
                                                            dpo_acc["samples"])
    results["hf_reward_matches"] = _export_and_score(rm_dir, os.path.join(workdir, "hf_reward"))
    results["reused"] = reused
    print(f"\ndemo finished in {time.time() - start:.0f} s; outputs under {workdir}/")
    if reused:
        print(f"reused finished runs: {', '.join(reused)} (delete {workdir} or run `make clean` "
              "to train from scratch)")
    print("\n" + results_table(results))
    print(f"\nTensorBoard: tensorboard --logdir {workdir}")
    return results


def _ppo_summary(ppo_dir: str, window: int = 10) -> dict:
    """The reward model's mean score of the rollouts logged in the first and in the last `window`
    steps, and the last logged KL, from the PPO run's metrics.jsonl."""
    import numpy as np
    from alignjax.train.metrics import read_metrics
    rows = [r for r in read_metrics(ppo_dir) if "objective/scores" in r]
    end = rows[-1]["step"]
    first = [r["objective/scores"] for r in rows if r["step"] <= window]
    last = [r["objective/scores"] for r in rows if r["step"] > end - window]
    return dict(score_first=float(np.mean(first)), score_last=float(np.mean(last)),
                kl_last=float(rows[-1]["objective/kl"]), window=window)


def _winrates(workdir: str, sft_dir: str, models: dict, rm_dir: str, reused: list,
              eval_n: int) -> list[dict]:
    """Each of `models` ({name: dir}) against SFT on the held-out toy prompts, judged three ways
    (`alignjax eval winrate`); a finished comparison (its winrate.json) is read back."""
    from alignjax.config import load_config
    from alignjax.eval import toy_judge
    from alignjax.eval.run import eval_winrate
    from alignjax.model.generate import SamplingParams

    data = os.path.join(workdir, "judge_data", "train.jsonl")
    if not os.path.isfile(data):
        os.makedirs(os.path.dirname(data), exist_ok=True)
        with open(data + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in toy_judge.sft_records(1500))
        os.replace(data + ".tmp", data)
    judge_dir = os.path.join(workdir, "judge")
    judge_cfg = load_config("configs/sft.py:tiny", [
        f"model.init_from={sft_dir}", "tokenizer.path=", f"data.train={data}", "data.eval=",
        "data.seq_len=256", "train.steps=150", "train.batch_size=16", "train.eval_every=0",
        "optimizer.lr=1e-3", "optimizer.warmup_steps=20"])
    print("a small LLM judge: the SFT model fine-tuned to answer vanilla judge prompts about toy "
          "pairs with the better output's letter (150 steps)")
    _stage("LLM judge", judge_cfg, judge_dir, reused)
    sampling = SamplingParams(max_new_tokens=24, temperature=0.0)
    rows = []
    for model_name, model_dir in models.items():
        for judge in ("toy", f"reward:{rm_dir}", f"llm:{judge_dir}"):
            name = judge.split(":")[0]
            out = os.path.join(workdir, "winrate", model_name.lower(), name)
            r = _read_winrate(out, model_dir, sft_dir, eval_n)
            if r is None:
                r = eval_winrate(model_dir, sft_dir, "toy", judge, out, sampling, template="vanilla",
                                 chat=True, num_prompts=eval_n)
            j = r["judge"]
            rows.append(dict(model=model_name, judge={"toy": "checker", "reward": "reward model",
                                                      "llm": "LLM judge (both orders)"}[name],
                             wins=r["wins"], ties=r["ties"], losses=r["losses"],
                             adjusted=r["adjusted_win_rate"], ci=r["adjusted_win_rate_ci95"],
                             lc=r["length_controlled_win_rate"],
                             consistency=j.get("positional_consistency")))
            print(f"  {model_name} vs SFT, {rows[-1]['judge']:26} wins {r['wins']:3}  ties {r['ties']:3}  "
                  f"losses {r['losses']:3}  adjusted win rate {r['adjusted_win_rate']:.1%}"
                  + (f"  (the judge's two orders agree on {j['positional_consistency']:.0%} of pairs)"
                     if j.get("positional_consistency") is not None else ""))
    print(f"tables, JSON and PNGs: {workdir}/winrate/*/*/; training curves: {workdir}/*/plots/")
    return rows


def _read_winrate(out: str, model_dir: str, sft_dir: str, eval_n: int) -> dict | None:
    """The winrate.json an earlier demo wrote for the same models and prompt count, else None."""
    try:
        with open(os.path.join(out, "winrate.json")) as f:
            r = json.load(f)
    except (OSError, ValueError):
        return None
    same = (r.get("model"), r.get("baseline"), r.get("wins", 0) + r.get("ties", 0) + r.get("losses", 0))
    return r if same == (model_dir, sft_dir, eval_n) else None


def results_table(r: dict) -> str:
    """The demo's results as the README's Markdown table."""
    hf = r["hf_generation_matches"] and r["hf_reward_matches"]
    rows = [
        (f"SFT, {r['sft']['params'] / 1e6:.2f}M-parameter Llama, {r['sft']['steps']} steps",
         f"held-out checker accuracy {r['sft']['before']:.1%} → {r['sft']['after']:.1%}"),
        (f"reward model from the SFT model, {r['reward']['steps']} steps of "
         f"{r['reward']['batch_size']} pairs",
         f"held-out pairwise accuracy {r['reward']['accuracy']:.1%}"),
        (f"{r['dpo']['loss']} (β = {r['dpo']['beta']:g}) from the SFT model, {r['dpo']['steps']} steps",
         f"implicit-reward accuracy {r['dpo']['implicit_accuracy']:.1%}; checker accuracy "
         f"{r['sft']['after']:.1%} → {r['dpo']['checker_accuracy']:.1%}"),
    ]
    if "ppo" in r:
        p = r["ppo"]
        rows.append((f"PPO from the SFT model, the reward model as the reward, {p['steps']} steps of "
                     f"{p['batch_size']} rollouts",
                     f"reward-model score{' (standardised)' if p.get('standardised') else ''} of the "
                     f"rollouts {p['score_first']:+.2f} → {p['score_last']:+.2f}; "
                     f"KL {p['kl_last']:.2f}; checker accuracy {r['sft']['after']:.1%} → "
                     f"{p['checker_accuracy']:.1%}"))
    rows += [
        ("export to HF", "transformers' greedy answers and reward scores equal alignjax's" if hf else
         f"MISMATCH: generation {'same' if r['hf_generation_matches'] else 'differs'}, "
         f"reward {'same' if r['hf_reward_matches'] else 'differs'}"),
    ]
    for w in r.get("winrates", []):
        rows.insert(-1, (f"{w.get('model', 'DPO')} vs SFT, judged by the {w['judge']}",
                         f"wins / ties / losses {w['wins']} / {w['ties']} / {w['losses']}; "
                         f"adjusted win rate {w['adjusted']:.1%} "
                         f"[{w['ci'][0]:.1%}, {w['ci'][1]:.1%}]"))
    return "\n".join(["| stage | result |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows])


def _export_and_generate(model_dir: str, hf_dir: str, samples) -> bool:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from alignjax.model.store import export_hf, load_model

    files = export_hf(load_model(model_dir), hf_dir, overwrite=True)  # a rerun replaces it
    print(f"exported {model_dir} -> {hf_dir} ({len(files)} files)")
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    all_match = True
    for prompt, ours, _ in samples[:3]:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      tokenize=True, return_dict=True, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, do_sample=False, max_new_tokens=24,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        match = text == ours
        all_match &= match
        print(f"  transformers: {prompt!r:40} -> {text!r}  ({'same as alignjax' if match else 'DIFFERS'})")
    return all_match


def _export_and_score(model_dir: str, hf_dir: str) -> bool:
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from alignjax.data.preference import format_pair_batch
    from alignjax.data.tokenizer import load_tokenizer
    from alignjax.model.store import export_hf, load_model
    from alignjax.train.reward import score_texts

    model = load_model(model_dir)
    export_hf(model, hf_dir, overwrite=True)
    prompts = ["sort: 7 3 5", "sort: 7 3 5", "reverse: cat dog fox", "reverse: cat dog fox"]
    responses = ["3 5 7", "3 7 5", "fox dog cat", "fox cat dog"]
    ours = score_texts(model, load_tokenizer(model.tokenizer_dir), prompts, responses, seq_len=64)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    hf = AutoModelForSequenceClassification.from_pretrained(hf_dir).eval()
    batch = format_pair_batch(tok, prompts, responses, 64)
    with torch.no_grad():
        theirs = hf(torch.tensor(batch["tokens"][:, 0].astype(np.int64)),
                    attention_mask=torch.tensor(batch["segment_ids"][:, 0] > 0).long()).logits[:, 0].numpy()
    for p, r, a, b in zip(prompts, responses, ours, theirs):
        print(f"  reward {p!r:24} {r!r:14} alignjax {a:+.4f}   transformers {b:+.4f}")
    return bool(np.allclose(ours, theirs, atol=1e-4))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/demo")
    p.add_argument("--sft-steps", type=int, default=None, help="override the tiny preset's steps")
    args = p.parse_args(argv)
    from alignjax.cli import quiet_platform
    quiet_platform()  # before jax is imported
    run(args.workdir, args.sft_steps)


if __name__ == "__main__":
    main()
