"""`alignjax <command>`: thin argument parsing around library functions.

Heavy imports (jax, transformers) happen inside the handlers so `--help` is instant. Problems the
user can fix (alignjax.errors.UserError and file-system errors naming a path) print one clear line,
no traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys

EPILOG = """examples:
  alignjax train --config configs/sft.py:tiny --workdir runs/sft --config.optimizer.lr=3e-3
  alignjax sweep --sweep configs/sweeps/sft_lr.py --workdir runs/sweep
  alignjax compile --config configs/sft.py:llama2_7b --topology v5p-64
  alignjax convert hf-to-alignjax --hf ./Llama-3.2-1B --out ./ckpt/llama32-1b
  alignjax generate --model ./ckpt/llama32-1b --prompt "Write a haiku about TPUs" --chat
  alignjax convert alignjax-to-hf --ckpt ./ckpt/llama32-1b --out ./hf-out --dtype bfloat16
  alignjax sample --model runs/sft --prompts toy --reward toy --mode pairs --n 4 --out pairs.jsonl
  alignjax bench forward --preset small --batch 8 --seq-len 256
  alignjax bench train --algorithm dpo --preset medium --batch 1,8 --seq-len 64
  alignjax bench rollout --preset small --batch 8,32 --seq-len 64 --new-tokens 32
  alignjax data check --train data/sft_train.jsonl --eval data/sft_eval.jsonl --out runs/check
"""


def parse_mesh(text: str | None) -> dict:
    from alignjax.sharding import parse_mesh_flag  # imports jax: only when a command runs
    return parse_mesh_flag(text)


def _add_mesh(p):
    p.add_argument("--mesh", default="", metavar="AXIS=N,...",
                   help="device mesh, e.g. data=2,fsdp=2,tensor=2 (-1 fills the rest; default: all "
                        "devices on data)")


# ---- handlers --------------------------------------------------------------------------------

def cmd_convert_hf_to_alignjax(args):
    from alignjax import sharding as shd
    from alignjax.errors import require_writable_dir
    require_writable_dir(args.out, "--out")
    from alignjax.model.store import check_output_dir, load_model, save_model_dir
    check_output_dir(args.out, args.overwrite)  # before loading: never into a training workdir
    model = load_model(args.hf, shd.make_mesh(parse_mesh(args.mesh)), head=args.head)
    save_model_dir(args.out, model.params, model.config, model.head, model.tokenizer_dir,
                   model.extra.get("generation_config"), overwrite=args.overwrite)
    n = model.config.num_params() if model.head == "lm" else None
    print(f"wrote alignjax model ({model.head} head{f', {n:,} parameters' if n else ''}) to {args.out}")


def cmd_convert_alignjax_to_hf(args):
    from alignjax import sharding as shd
    from alignjax.errors import require_writable_dir
    require_writable_dir(args.out, "--out")
    from alignjax.model.store import check_output_dir, export_hf, load_model
    check_output_dir(args.out, args.overwrite)  # before loading: never into a training workdir
    model = load_model(args.ckpt, shd.make_mesh(parse_mesh(args.mesh)), slot=args.slot)
    files = export_hf(model, args.out, dtype=args.dtype,
                      max_shard_bytes=int(args.max_shard_gb * 1024**3), overwrite=args.overwrite)
    arch = "LlamaForSequenceClassification" if model.head == "scalar" else "LlamaForCausalLM"
    print(f"wrote {arch} ({args.dtype}) to {args.out}: {len(files)} files")


def cmd_generate(args):
    from alignjax import sharding as shd
    from alignjax.conditional import generation_setup
    from alignjax.model.generate import Generator, completions_to_text
    from alignjax.model.store import load_model
    from alignjax.model.tokenize import load_model_tokenizer
    sampling = _sampling_params(args)  # bad flags fail before the model loads
    model = load_model(args.model, shd.make_mesh(parse_mesh(args.mesh)), head="lm")
    tokenizer = load_model_tokenizer(model, args.model)
    # Control tokens of a conditional-token model are never generated, conditioned or not.
    prompts, blocked = generation_setup(tokenizer, args.prompt, args.condition, chat=args.chat,
                                        vocab_size=model.config.vocab_size)
    eos = model.eos_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    gen = Generator(model.module, model.mesh, model.rules, eos_ids=eos, pad_id=pad,
                    blocked_ids=blocked, overflow="truncate" if args.truncate_prompts else "error")
    out = gen.generate_ids(model.params, prompts, sampling)
    texts = completions_to_text(tokenizer, out["tokens"], out["mask"], eos)
    if args.json:
        print(json.dumps([{"prompt": p, "completion": t} for p, t in zip(args.prompt, texts)], indent=2))
    else:
        for t in texts:
            print(t)


def _config(args):
    from alignjax.config import load_config
    return load_config(args.config, args.overrides)


def cmd_train(args):
    from alignjax.train import run_training
    run_training(_config(args), args.workdir)


def cmd_iterate(args):
    from alignjax.train import expert_iteration
    expert_iteration.run(_config(args), args.workdir)


def cmd_compare(args):
    from alignjax import compare
    compare.run(_config(args), args.workdir)


def cmd_sweep(args):
    from alignjax.config import expand_sweep, load_config
    base, runs = expand_sweep(args.sweep)
    if args.print_commands:  # one `alignjax train` line per run, for launch/tpu.sh sweep
        import shlex
        for name, overrides in runs:
            print(shlex.join(["alignjax", "train", "--config", base, "--workdir",
                              os.path.join(args.workdir, name)]
                             + [f"--config.{o}" for o in overrides] + list(args.overrides)))
        return
    print(f"sweep {args.sweep}: {len(runs)} runs of {base}")
    for i, (name, overrides) in enumerate(runs, 1):
        workdir = os.path.join(args.workdir, name)
        print(f"[{i}/{len(runs)}] {name} -> {workdir}")
        from alignjax.train import run_training
        run_training(load_config(base, list(overrides) + list(args.overrides)), workdir)


def cmd_compile(args):
    from alignjax import aot
    from alignjax.train.compile import compile_programs
    from alignjax.train.registry import validate_config
    config = _config(args)
    spec = aot.parse_topology(args.topology)
    _apply_num_slices(config, args.num_slices)
    validate_config(config, spec.chips * args.num_slices)

    def progress(message):
        print(f"compile: {message}", file=sys.stderr, flush=True)

    reports = compile_programs(config, args.topology, progress=progress)
    for name, report in reports:
        print((f"{name}: " if len(reports) > 1 else "") + aot.format_report(report))
    if not all(report.fits for _, report in reports):
        sys.exit(1)


def _apply_num_slices(config, num_slices: int):
    """--num-slices N: data parallelism across N slices unless the config's mesh.dcn_* say how."""
    from alignjax.errors import UserError
    from alignjax.sharding import DCN_AXES
    if num_slices < 1:
        raise UserError(f"--num-slices {num_slices}: must be >= 1")
    dcn = {a: int(config.mesh.get(a, 1)) for a in DCN_AXES}
    if math.prod(dcn.values()) == 1:
        config.mesh.dcn_data = num_slices
    elif math.prod(dcn.values()) != num_slices:
        raise UserError(f"--num-slices {num_slices} but the config's mesh.dcn_* sizes "
                        f"({', '.join(f'{k}={v}' for k, v in dcn.items())}) make "
                        f"{math.prod(dcn.values())} slices; make them agree")


def cmd_score(args):
    from alignjax import sharding as shd
    from alignjax.data.tokenizer import load_tokenizer
    from alignjax.model.store import load_model
    from alignjax.train.reward import score_texts
    from alignjax.errors import UserError
    if len(args.prompt) != len(args.response):
        raise UserError(f"give one --response per --prompt (got {len(args.prompt)} --prompt, "
                        f"{len(args.response)} --response)")
    if args.max_length < 2:  # a prompt token and a response token at least
        raise UserError(f"--max-length {args.max_length}: must be >= 2 tokens (default 1024)")
    model = load_model(args.model, shd.make_mesh(parse_mesh(args.mesh)), head="scalar")
    if model.tokenizer_dir is None:
        raise UserError(f"--model {args.model}: no tokenizer stored with the model; copy the "
                        "tokenizer files into it")
    tok = load_tokenizer(model.tokenizer_dir)
    rewards = score_texts(model, tok, args.prompt, args.response, seq_len=args.max_length,
                          chat_template=not args.no_chat_template)
    if args.json:
        print(json.dumps([{"prompt": p, "response": r, "reward": float(x)}
                          for p, r, x in zip(args.prompt, args.response, rewards)], indent=2))
    else:
        for x in rewards:
            print(f"{float(x):.6f}")


def cmd_sample(args):
    from alignjax import sharding as shd
    from alignjax import sampling
    from alignjax.model.store import load_model
    from alignjax.model.tokenize import load_model_tokenizer
    from alignjax.errors import require_writable_file
    require_writable_file(args.out, "--out")  # before any sampling work
    _sampling_params(args)  # checks --temperature/--top-p/--top-k/--max-new-tokens up front
    mesh = shd.make_mesh(parse_mesh(args.mesh))
    model = load_model(args.model, mesh, head="lm")
    tokenizer = load_model_tokenizer(model, args.model)
    prompts = sampling.read_prompts(args.prompts, args.num_prompts)
    reward_fn = sampling.reward_function(args.reward, mesh)
    report = sampling.sample_dataset(
        model, tokenizer, prompts, reward_fn, args.mode, args.n, args.out,
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed,
        chat=not args.no_chat, rso_beta=args.rso_beta, rso_accept_n=args.rso_accept,
        min_reward=args.min_reward,
        run_key={"model": args.model, "reward": args.reward, "prompts": args.prompts})
    print(f"wrote {report.records} {args.mode} records to {args.out} from {report.prompts} prompts x "
          f"{args.n} samples; mean reward {report.mean_reward:.4f}, best-of-{args.n} "
          f"{report.best_of_n_reward:.4f}"
          + (f"; {report.skipped} prompts yielded no record ("
             + ("no sample reached --min-reward" if args.min_reward is not None
                else "all samples scored the same") + ")" if report.skipped else "")
          + (f"; {report.empty} empty responses left out" if report.empty else ""))


def cmd_bench(args):
    from alignjax import bench
    results = bench.run_batches(args.what, args.batch, preset=args.preset, hf_config=args.hf_config,
                                seq_len=args.seq_len, new_tokens=args.new_tokens, steps=args.steps,
                                dtype=args.dtype, mesh=parse_mesh(args.mesh), with_torch=not args.no_torch,
                                algorithm=args.algorithm, samples_per_prompt=args.samples_per_prompt)
    print(bench.format_result(results[0]) if len(results) == 1 else bench.format_table(results))
    if args.json:  # one batch: the result object; several: {"results": [one per batch]}
        with open(args.json, "w") as f:
            json.dump(results[0] if len(results) == 1 else {"results": results}, f, indent=2)


def _batch_list(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive batch sizes, e.g. 8 or 1,8,32,64")
    return sizes


def _sampling_params(args):
    """The sampling flags as SamplingParams, which checks them (commands call it before any work)."""
    from alignjax.model.generate import SamplingParams
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, seed=args.seed)


def cmd_eval_winrate(args):
    from alignjax import sharding as shd
    from alignjax.eval.run import eval_winrate, winrate_markdown
    report = eval_winrate(args.model, args.baseline, args.prompts, args.judge, args.out,
                          _sampling_params(args), template=args.template, order=args.order,
                          verdict=args.verdict, chat=args.chat, num_prompts=args.num_prompts,
                          batch_size=args.batch_size, judge_max_new_tokens=args.judge_max_new_tokens,
                          mesh=shd.make_mesh(parse_mesh(args.mesh)))
    print(winrate_markdown(report), end="")
    print(f"wrote {args.out}/winrate.md, winrate.json, winrate.png, samples.jsonl")


def cmd_eval_judge(args):
    from alignjax import sharding as shd
    from alignjax.eval.run import eval_judge, judge_markdown
    report = eval_judge(args.judge, args.pairs, template=args.template, verdict=args.verdict,
                        out=args.out, num_pairs=args.num_pairs,
                        judge_max_new_tokens=args.judge_max_new_tokens,
                        mesh=shd.make_mesh(parse_mesh(args.mesh)))
    print(judge_markdown(report), end="")
    if args.out:
        print(f"wrote {args.out}/judge.md, judge.json")


def cmd_eval_length(args):
    from alignjax import sharding as shd
    from alignjax.eval.run import eval_length
    report = eval_length(args.model, args.prompts, args.reward, args.out, _sampling_params(args),
                         chat=args.chat, num_prompts=args.num_prompts, batch_size=args.batch_size,
                         mesh=shd.make_mesh(parse_mesh(args.mesh)))
    with open(os.path.join(args.out, "length.md")) as f:
        print(f.read(), end="")
    print(f"wrote {args.out}/length.md, length.json, length.png ({len(report['models'])} models)")


def cmd_plot(args):
    from alignjax.eval.plots import plot_metrics
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    print(f"wrote {plot_metrics(args.workdirs, metrics, args.out)}")


_DATA_TOY_KINDS = {"auto": "sft", "sft": "sft", "pair": "preference", "ranked": "ranked",
                   "kto": "kto"}  # --kind -> the toy suite's record format (data.train=toy)


def _config_data_kind(config) -> str:
    """The record kind a config's trainer reads: sft, pair (reward), DPO's pair/ranked/kto."""
    if config.algorithm == "dpo":
        from alignjax.train.dpo import settings
        return settings(config).kind
    return {"sft": "sft", "reward": "pair"}.get(config.algorithm, "auto")


def cmd_data_check(args):
    import tempfile
    from alignjax.data import check
    from alignjax.errors import UserError, require_writable_dir
    from alignjax.train.setup import data_sources, tokenizer_for
    if args.out:
        require_writable_dir(args.out, "--out")
    if args.tokenizer and args.config:
        raise UserError("give --tokenizer or --config, not both")
    if args.overrides and not args.config:
        raise UserError(f"{args.overrides[0]}: --config.KEY=VALUE overrides need --config")
    config = _config(args) if args.config else None
    d = config.data if config is not None else None
    train = args.train or (d.train if d is not None else "")
    if not train:
        raise UserError("--train: name the training data (a.jsonl,b.parquet,dir,hf://name or toy), "
                        "or give --config")
    evals = args.eval if args.eval is not None else (d.eval if d is not None else "")
    seq_len = args.seq_len or (int(d.seq_len) if d is not None else None)
    kind = args.kind if args.kind != "auto" or config is None else _config_data_kind(config)
    with tempfile.TemporaryDirectory() as tmp:
        if args.tokenizer == "toy" or (config is not None):
            from ml_collections import ConfigDict
            tok_cfg = config or ConfigDict({"tokenizer": {"path": "toy", "vocab_size": 512},
                                            "model": {"init_from": ""}})
            tokenizer = tokenizer_for(tok_cfg, tmp)
        elif args.tokenizer:
            from alignjax.data.tokenizer import load_tokenizer
            tokenizer = load_tokenizer(args.tokenizer)
        else:
            tokenizer = None
        toy_dir = args.out or tmp  # data.train=toy: the toy records are written here
        toy_kind = _DATA_TOY_KINDS[kind]
        report = check.check_data(
            data_sources(train, toy_dir, "train", toy_kind),
            data_sources(evals, toy_dir, "eval", toy_kind) if evals else None,
            tokenizer, d, seq_len, kind, args.threshold, args.ngram, args.examples)
    print(check.render(report), end="")
    if args.out:
        print(f"wrote {check.write_report(report, args.out)}")


# ---- parser ----------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors like every other alignjax error (usage stays in --help)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="alignjax", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Align Llama-family models with JAX: convert, generate, benchmark.")
    from alignjax import distributed
    distributed.add_flags(parser)  # taken from anywhere in the command line by main()
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    conv = sub.add_parser("convert", help="Hugging Face <-> alignjax checkpoints")
    conv_sub = conv.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    p = conv_sub.add_parser("hf-to-alignjax", help="HF Llama directory -> alignjax model directory")
    p.add_argument("--hf", required=True, help="local HF directory (config.json + *.safetensors)")
    p.add_argument("--out", required=True, help="output alignjax model directory")
    p.add_argument("--head", choices=("lm", "scalar"), default=None,
                   help="force the head (default: from config.json architectures)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --out (never a training workdir)")
    _add_mesh(p)
    p.set_defaults(func=cmd_convert_hf_to_alignjax)
    p = conv_sub.add_parser("alignjax-to-hf", help="alignjax model directory -> HF directory")
    p.add_argument("--ckpt", required=True, help="alignjax model directory or training workdir")
    p.add_argument("--slot", default=None, metavar="NAME",
                   help="another trained model of a training workdir, e.g. PPO's value model "
                        "(--slot value, written as LlamaForSequenceClassification); default: the "
                        "workdir's policy")
    p.add_argument("--out", required=True, help="output HF directory")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="float32")
    p.add_argument("--max-shard-gb", type=float, default=2.0, help="max size of one safetensors file")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --out (never a training workdir)")
    _add_mesh(p)
    p.set_defaults(func=cmd_convert_alignjax_to_hf)

    p = sub.add_parser("generate", help="sample completions with the KV cache",
                       description="Prints one completion per --prompt (completion text only).")
    p.add_argument("--model", required=True, help="HF directory or alignjax model directory")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    p.add_argument("--condition", choices=("good", "bad"), default=None,
                   help="conditional-token model: prefix each prompt with <|good|> or <|bad|> "
                        "(control tokens are never generated)")
    p.add_argument("--json", action="store_true", help="print a JSON list of {prompt, completion}")
    p.add_argument("--truncate-prompts", action="store_true",
                   help="left-truncate prompts that do not fit max_position_embeddings with "
                        "--max-new-tokens (default: refuse them)")
    _add_mesh(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("train", help="train (or resume) with a config file",
                       description="Runs the algorithm of the config (sft, ...). Running the same "
                                   "command again on the same --workdir resumes from its latest "
                                   "checkpoint. Override any config key with --config.KEY=VALUE.")
    p.add_argument("--config", required=True, metavar="FILE.py[:PRESET]", help="e.g. configs/sft.py:tiny")
    p.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, tb/, config.json")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("iterate", help="expert iteration: rounds of sample, keep the best, fine-tune",
                       description="Expert iteration (rejection-sampling fine-tuning): each round "
                                   "samples from the current policy, keeps the best (or every "
                                   "good-enough) response per prompt and fine-tunes on them with SFT. "
                                   "Running the same command again continues where it stopped. "
                                   "Override any config key with --config.KEY=VALUE.")
    p.add_argument("--config", required=True, metavar="FILE.py[:PRESET]",
                   help="e.g. configs/expert_iteration.py:tiny")
    p.add_argument("--workdir", required=True,
                   help="round_R/ (samples.jsonl, sft/, round.json) per round, expert_iteration.json")
    p.set_defaults(func=cmd_iterate)

    p = sub.add_parser("compare", help="run many alignment methods from one SFT start, one table",
                       description="From compare.start, train every method of compare.methods for "
                                   "compare.steps steps (toy presets), then score each on the "
                                   "held-out toy prompts: accuracy, KL to the start, length, "
                                   "samples, seconds. Writes WORKDIR/compare.md, .json and .png; "
                                   "running the same command again resumes.")
    p.add_argument("--config", required=True, metavar="FILE.py[:PRESET]", help="configs/compare.py:toy")
    p.add_argument("--workdir", required=True, help="one folder per method, compare.md/.json/.png")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("sweep", help="run a sweep file's override sets one after another")
    p.add_argument("--sweep", required=True, help="configs/sweeps/NAME.py")
    p.add_argument("--workdir", required=True, help="each run goes to WORKDIR/<run name>")
    p.add_argument("--print-commands", action="store_true",
                   help="print one `alignjax train` command per run instead of running them")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("compile", help="compile the train step for a TPU topology (needs libtpu) and "
                                       "report whether it fits",
                       description="Ahead-of-time compile on this host for e.g. --topology v5p-64 "
                                   "(v4-N, v5p-N: TensorCores; v5e-N, v6e-N: chips). PPO and GRPO "
                                   "also compile their rollout (sampling and scoring with the "
                                   "train state and every model resident). Exits 1 when a "
                                   "program does not fit in HBM.")
    p.add_argument("--config", required=True, metavar="FILE.py[:PRESET]")
    p.add_argument("--topology", required=True, help="Cloud TPU name, e.g. v5p-64, v5e-256, v6e-8")
    p.add_argument("--num-slices", type=int, default=1, metavar="N",
                   help="multislice: N such slices joined by the data-center network (data "
                        "parallel across slices unless the config sets mesh.dcn_*)")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("score", help="print the reward of (prompt, response) pairs",
                       description="Scores each --prompt/--response pair with a reward model "
                                   "(alignjax model dir, training workdir or HF "
                                   "LlamaForSequenceClassification), formatted as in training.")
    p.add_argument("--model", required=True)
    p.add_argument("--prompt", action="append", required=True)
    p.add_argument("--response", action="append", required=True)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--no-chat-template", action="store_true",
                   help="plain prompt + response text instead of the tokenizer's chat template")
    p.add_argument("--json", action="store_true")
    _add_mesh(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("sample", help="sample n responses per prompt, score them, write best-of-n, "
                                      "pairs, ranked or RSO data",
                       description="Samples --n responses per prompt from --model, scores them with "
                                   "--reward (the toy checker or a reward model) and writes JSONL "
                                   "that the trainers read: best_of_n -> SFT records (expert "
                                   "iteration), pairs -> best vs worst preference pairs (on-policy "
                                   "DPO data), ranked -> RRHF/PRO records, rso -> RSO rejection-"
                                   "sampled pairs (docs/algorithms.md section 5).")
    p.add_argument("--model", required=True, help="policy: alignjax model dir, training workdir or HF dir")
    p.add_argument("--prompts", required=True,
                   help="'toy' (toy-suite training prompts) or a JSONL/Parquet/dataset with 'prompt'")
    p.add_argument("--reward", required=True,
                   help="reward spec: toy (the checker), a reward-model dir, python:FILE:FUNCTION, "
                        "or a weighted sum such as 'toy + 0.5*runs/rm' (see README, Reward sources)")
    p.add_argument("--mode", choices=("best_of_n", "filtered", "all", "pairs", "ranked", "rso"),
                   default="pairs",
                   help="best_of_n: the best response (SFT record); filtered: every distinct response "
                        "scoring >= --min-reward (SFT records); all: every response with its reward, "
                        "repeats included (SFT records); pairs: best vs worst; ranked: "
                        "RRHF/PRO lists; rso: RSO rejection sampling, paired")
    p.add_argument("--out", required=True, help="output JSONL file")
    p.add_argument("--n", type=int, default=4, help="samples per prompt (RSO: candidates, e.g. 64)")
    p.add_argument("--num-prompts", type=int, default=0, help="use the first N prompts (0: all)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=256, help="sequences per generate call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-chat", action="store_true", help="raw prompts instead of the chat template")
    p.add_argument("--rso-beta", type=float, default=0.5, help="RSO: temperature of the target r/beta")
    p.add_argument("--min-reward", type=float, default=None,
                   help="best_of_n / filtered / all: keep only responses scoring at least this "
                        "(e.g. 1 with the toy checker: correct answers only)")
    p.add_argument("--rso-accept", type=int, default=8, help="RSO: samples to accept per prompt")
    _add_mesh(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("bench", help="tokens/s (and MFU) of alignjax vs transformers (PyTorch)")
    p.add_argument("what", choices=("forward", "generate", "rollout", "train"))
    p.add_argument("--algorithm", choices=("sft", "dpo"), default="sft",
                   help="train: the step to time (dpo: --batch counts pairs, with a frozen reference)")
    p.add_argument("--preset", default="small", help="model size preset: tiny, small, medium, 1b")
    p.add_argument("--hf-config", default=None, help="take the architecture from an HF config.json dir")
    p.add_argument("--batch", type=_batch_list, default=[8],
                   help="batch size, or a comma-separated list (1,8,32,64): one table row each")
    p.add_argument("--seq-len", type=int, default=256,
                   help="forward/train: sequence length; generate/rollout: prompt length")
    p.add_argument("--new-tokens", type=int, default=64, help="generate/rollout: tokens per sequence")
    p.add_argument("--samples-per-prompt", type=int, default=1,
                   help="rollout: responses per prompt (--batch counts responses)")
    p.add_argument("--steps", type=int, default=5, help="timed repetitions after warm-up")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--no-torch", action="store_true", help="skip the transformers comparison")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the result as JSON")
    _add_mesh(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("eval", help="win rates (reward model, checker or LLM judge), judge "
                                    "meta-evaluation, length bias")
    ev = p.add_subparsers(dest="eval_command", metavar="WHAT", required=True)

    def eval_sampling_flags(p):
        p.add_argument("--prompts", required=True,
                       help="'toy' (toy held-out prompts) or a JSONL/Parquet file with 'prompt'")
        p.add_argument("--num-prompts", type=int, default=0, help="first N prompts (0: all; toy: 200)")
        p.add_argument("--max-new-tokens", type=int, default=64)
        p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
        p.add_argument("--top-p", type=float, default=1.0)
        p.add_argument("--top-k", type=int, default=0, help="0 = off")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
        p.add_argument("--batch-size", type=int, default=64, help="sequences per generate call")
        p.add_argument("--out", required=True, help="output directory (table, JSON, PNG)")
        _add_mesh(p)

    def judge_flags(p):
        p.add_argument("--template", default="rules",
                       metavar="vanilla|rules|rules_metrics_reference|mtbench",
                       help="LLM judge prompt (default rules)")
        p.add_argument("--verdict", choices=("prob", "text"), default="prob",
                       help="LLM judge: label-token probabilities (one forward pass) or parsed "
                            "generated text")
        p.add_argument("--judge-max-new-tokens", type=int, default=128,
                       help="LLM judge: tokens per generated reply (text mode, first stage)")

    p = ev.add_parser("winrate", help="win rate of --model against --baseline",
                      description="Generates with both models (each with its own tokenizer) and "
                                  "judges the texts: wins/ties/losses, adjusted win rate with a "
                                  "bootstrap 95%% interval, length-controlled win rate, mean "
                                  "lengths. Writes winrate.md, winrate.json, winrate.png and "
                                  "samples.jsonl under --out.")
    p.add_argument("--model", required=True)
    p.add_argument("--baseline", required=True)
    p.add_argument("--judge", required=True, help="toy | reward:DIR | llm:DIR")
    p.add_argument("--order", choices=("both", "single"), default="both",
                   help="LLM judge: judge each pair in both orders (default) or as given")
    judge_flags(p)
    eval_sampling_flags(p)
    p.set_defaults(func=cmd_eval_winrate)

    p = ev.add_parser("judge", help="meta-evaluate a judge on gold-labelled pairs",
                      description="Accuracy over both orders, positional agreement, first-order "
                                  "accuracy, per subset (LLMBar's measures).")
    p.add_argument("--judge", required=True, help="llm:DIR | reward:DIR | toy")
    p.add_argument("--pairs", required=True,
                   help="'toy' (toy judge pairs) or JSONL {prompt, output_a, output_b, label: A|B, "
                        "subset}")
    p.add_argument("--num-pairs", type=int, default=0, help="first N pairs (toy: N per subset, "
                                                            "default 100)")
    p.add_argument("--out", default=None, help="also write judge.md and judge.json here")
    judge_flags(p)
    _add_mesh(p)
    p.set_defaults(func=cmd_eval_judge)

    p = ev.add_parser("length", help="response length per model and its correlation with reward")
    p.add_argument("--model", action="append", required=True, help="model dir (repeatable)")
    p.add_argument("--reward", required=True,
                   help="reward spec: toy, a reward-model dir, python:FILE:FUNCTION, or a weighted "
                        "sum such as 'toy + 0.5*runs/rm' (see README, Reward sources)")
    eval_sampling_flags(p)
    p.set_defaults(func=cmd_eval_length)

    p = sub.add_parser("plot", help="PNG curves of metrics.jsonl keys against step")
    p.add_argument("workdirs", nargs="+", metavar="WORKDIR")
    p.add_argument("--metrics", required=True, help="comma-separated keys, e.g. loss,eval/accuracy")
    p.add_argument("--out", required=True, help="output PNG file")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("data", help="check training data before a run")
    data_sub = p.add_subparsers(dest="data_command", metavar="WHAT", required=True)
    p = data_sub.add_parser(
        "check", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="duplicate prompts, train/eval overlap, token lengths under seq_len",
        description="Report exact duplicate training prompts (same text after case/whitespace "
                    "normalisation), near duplicates (Jaccard over word n-grams >= --threshold; "
                    "MinHash LSH candidates, each verified with the exact Jaccard), training "
                    "prompts that repeat evaluation prompts (exact and near), and with a tokenizer "
                    "the prompt/response token lengths and how many records --seq-len truncates or "
                    "drops (the trainers' own formatting). Locations are file:line.",
        epilog="examples:\n"
               "  alignjax data check --train data/sft_train.jsonl --eval data/sft_eval.jsonl\n"
               "  alignjax data check --train a.jsonl,b.jsonl --eval eval.jsonl "
               "--tokenizer ./ckpt/llama32-1b --seq-len 2048 --out runs/check\n"
               "  alignjax data check --config configs/sft.py:tiny   # data, tokenizer, seq_len "
               "of the config")
    p.add_argument("--train", default="", metavar="SPEC[,SPEC...]",
                   help="training data: .jsonl, .parquet, save_to_disk dir, hf://name[:split], a glob "
                        "or toy (default: the config's data.train)")
    p.add_argument("--eval", default=None, metavar="SPEC[,SPEC...]",
                   help="evaluation data, same syntax (default: the config's data.eval; '' = none)")
    p.add_argument("--tokenizer", default="", metavar="DIR",
                   help="tokenizer directory (HF or alignjax model dir) or toy, for token lengths")
    p.add_argument("--config", default="", metavar="FILE[:PRESET]",
                   help="a training config: its data.train/eval, tokenizer, seq_len, format, "
                        "truncation and data.from_ratings (flags given here win; "
                        "--config.KEY=VALUE overrides a key)")
    p.add_argument("--seq-len", type=int, default=None, metavar="N",
                   help="count the records this length truncates or drops (default: the config's)")
    p.add_argument("--kind", default="auto", choices=["auto", "sft", "pair", "ranked", "kto"],
                   help="record kind for the token lengths (default: from the first record)")
    p.add_argument("--threshold", type=float, default=0.8,
                   help="near-duplicate Jaccard threshold (default 0.8)")
    p.add_argument("--ngram", type=int, default=3, help="words per shingle (default 3)")
    p.add_argument("--examples", type=int, default=10,
                   help="examples listed per finding (default 10)")
    p.add_argument("--out", default="", metavar="DIR", help="also write DIR/check.json")
    p.set_defaults(func=cmd_data_check)
    return parser


def quiet_platform() -> None:
    """JAX_PLATFORMS=cpu on a host with no accelerator, unless the user chose a platform.

    With the `tpu` extra installed, jax probes libtpu on every start and prints about six lines of
    libtpu errors when no TPU is attached; a TPU VM has /dev/accel* or /dev/vfio, a GPU host
    /dev/nvidia*, and those keep jax's own choice. `alignjax compile` loads libtpu on demand.
    """
    if "JAX_PLATFORMS" in os.environ:
        return
    if not any(glob.glob(p) for p in ("/dev/accel*", "/dev/vfio", "/dev/nvidia*")):
        os.environ["JAX_PLATFORMS"] = "cpu"


def main(argv=None):
    quiet_platform()
    parser = build_parser()
    from alignjax import distributed
    dist, argv = distributed.split_flags(sys.argv[1:] if argv is None else list(argv))
    args, unknown = parser.parse_known_args(argv)
    args.overrides = [u for u in unknown if u.startswith("--config.")]
    rest = [u for u in unknown if not u.startswith("--config.")]
    if rest or (args.overrides and args.command not in ("train", "iterate", "compare", "sweep", "compile",
                                                        "data")):
        parser.error(f"unrecognized arguments: {' '.join(rest or args.overrides)}")
    for flag, value in _path_flags(args):
        if "://" in value and not value.startswith("file://") and not _url_allowed(args, flag):
            _fail(f"{flag} {value}: a URL (gs://...) works as `train`/`sweep` --workdir and as "
                  "`convert alignjax-to-hf` --ckpt/--out; here give a local path (on a pod one "
                  "that every worker sees, e.g. an NFS/Filestore mount)")
    _local_file_urls(args)
    from alignjax.errors import UserError, describe_os_error
    try:
        distributed.initialize(dist)  # before any jax device use
        args.func(args)
    except UserError as e:
        _fail(str(e))
    except OSError as e:
        if e.filename is None and not isinstance(e, FileNotFoundError):
            raise  # no path to name: not the user's file system, a bug
        _fail(describe_os_error(e) if e.filename is not None else str(e))
    except KeyboardInterrupt:
        print("alignjax: interrupted", file=sys.stderr)
        sys.exit(130)


def _local_file_urls(args):
    """file:///abs/path -> /abs/path in every path flag: the local file system, named as a URL."""
    from alignjax import fs
    for name in ("workdir", "out", "ckpt"):
        value = getattr(args, name, None)
        if isinstance(value, str):
            setattr(args, name, fs.without_file_scheme(value))
    if getattr(args, "workdirs", None):
        args.workdirs = [fs.without_file_scheme(w) for w in args.workdirs]


def _url_allowed(args, flag: str) -> bool:
    """Where a bucket URL works end to end (alignjax.fs): a run's workdir and the HF export."""
    if args.command in ("train", "sweep"):
        return flag == "--workdir"
    return args.command == "convert" and getattr(args, "direction", "") == "alignjax-to-hf"


def _path_flags(args):
    """(flag, value) of the arguments that name a run's folder or a model to read or write."""
    for name in ("workdir", "out", "ckpt"):
        if isinstance(getattr(args, name, None), str):
            yield f"--{name}", getattr(args, name)
    for value in getattr(args, "workdirs", None) or ():
        yield "WORKDIR", value


def _fail(message: str):
    print(f"alignjax: error: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
