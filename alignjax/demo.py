"""`make demo`: the end-to-end pipeline on the built-in toy suite, on the CPU, in minutes.

    1. SFT of a small Llama from scratch on the toy instructions (progress bar, metrics.jsonl, tb/)
    2. checker accuracy of greedy answers on held-out prompts, before and after, with samples
    3. export to Hugging Face format and a generation with transformers from the exported directory

Every stage writes to WORKDIR so the results can be inspected (and TensorBoard pointed at it).
"""

from __future__ import annotations

import argparse
import os
import time


def _banner(text: str):
    print("\n" + "=" * 78 + f"\n{text}\n" + "=" * 78, flush=True)


def _show_samples(samples):
    for prompt, answer, ok in samples:
        print(f"  [{'ok' if ok else '--'}] {prompt!r:44} -> {answer!r}")


def run(workdir: str, sft_steps: int | None = None, eval_n: int = 200) -> dict:
    import jax
    from alignjax.cli import run_training
    from alignjax.config import load_config
    from alignjax.eval.toy import toy_accuracy
    from alignjax.train.setup import build_run, initial_params

    start = time.time()
    results = {}
    sft_dir = os.path.join(workdir, "sft")
    overrides = [f"train.steps={sft_steps}"] if sft_steps else []
    config = load_config("configs/sft.py:tiny", overrides)

    _banner("1/3  SFT of a tiny Llama on the toy instruction suite (from scratch)")
    run_ = build_run(config, sft_dir)
    print(f"model: {run_.model_config.num_params():,} parameters, vocab {len(run_.tokenizer)}, "
          f"mesh {dict(run_.mesh.shape)} over {jax.device_count()} devices")
    before = toy_accuracy(run_.module, initial_params(config, run_.module, run_.mesh, run_.rules),
                          run_.mesh, run_.rules, run_.tokenizer, n=eval_n)
    print(f"checker accuracy before SFT (random weights): {before['accuracy']:.1%}")
    out = run_training(config, sft_dir)

    _banner("2/3  Held-out checker accuracy of greedy answers")
    after = toy_accuracy(run_.module, out["state"]["params"], run_.mesh, run_.rules, run_.tokenizer,
                         n=eval_n)
    print(f"before SFT: {before['accuracy']:.1%}   after SFT: {after['accuracy']:.1%}   "
          f"(by task: {', '.join(f'{k} {v:.0%}' for k, v in after['by_task'].items())})")
    _show_samples(after["samples"])
    results["sft"] = {"before": before["accuracy"], "after": after["accuracy"]}

    _banner("3/3  Export to Hugging Face and generate with transformers")
    results["hf_generation_matches"] = _export_and_generate(sft_dir, os.path.join(workdir, "hf_sft"),
                                                            after["samples"])
    print(f"\ndemo finished in {time.time() - start:.0f} s; outputs under {workdir}/")
    print(f"  TensorBoard: tensorboard --logdir {workdir}")
    return results


def _export_and_generate(model_dir: str, hf_dir: str, samples) -> bool:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from alignjax.model.store import export_hf, load_model

    files = export_hf(load_model(model_dir), hf_dir)
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/demo")
    p.add_argument("--sft-steps", type=int, default=None, help="override the tiny preset's steps")
    args = p.parse_args(argv)
    run(args.workdir, args.sft_steps)


if __name__ == "__main__":
    main()
