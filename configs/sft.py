"""Supervised fine-tuning (SFT) config and presets.

    alignjax train --config configs/sft.py:tiny --workdir runs/sft --config.optimizer.lr=3e-3

Presets: tiny (CPU smoke test on the toy suite), small (a ~10M model, toy suite, CPU/GPU),
llama2_7b, llama3_8b, llama3_70b (the real architectures; meshes sized for TPU pods, e.g.
v5p-64 = 32 chips). Every preset has every key below; a preset only changes values.
"""

from ml_collections import ConfigDict

PRESETS = ("tiny", "small", "llama2_7b", "llama3_8b", "llama3_70b")
DEFAULT_PRESET = "tiny"


def base_config() -> ConfigDict:
    """The full schema with defaults for fine-tuning a pretrained model."""
    c = ConfigDict()
    c.algorithm = "sft"

    c.model = m = ConfigDict()
    m.init_from = ""  # "" = random init from the fields below; else an HF or alignjax model dir
    m.vocab_size = 32000
    m.hidden_size = 4096
    m.intermediate_size = 11008
    m.num_hidden_layers = 32
    m.num_attention_heads = 32
    m.num_key_value_heads = 32
    m.head_dim = None  # None = hidden_size // num_attention_heads
    m.max_position_embeddings = 4096
    # > 0: the context window of the run (and of the model it saves), also for a model read from
    # init_from: extends a checkpoint's context (RoPE positions are computed; no weights change).
    m.context_length = 0
    m.rope_theta = 10000.0
    m.rope_scaling = None  # or a dict, e.g. Llama 3.1: {"rope_type": "llama3", "factor": 8.0, ...}
    m.tie_word_embeddings = False
    m.rms_norm_eps = 1e-5
    m.dtype = "bfloat16"  # compute dtype: float32 | bfloat16
    m.param_dtype = "float32"  # master weights and optimizer state stay float32
    m.remat_policy = "full"  # none | full | dots | dots_with_no_batch_dims
    m.attention_impl = "xla"  # xla | flash (Pallas TPU flash attention; seq_len a multiple of 128)
    m.layer_loop = "auto"  # scan | unroll | auto (unroll up to 16 layers: faster steps, longer compiles)

    c.tokenizer = ConfigDict()
    # "" = the tokenizer stored with model.init_from; "toy" = train a small one on the toy suite.
    c.tokenizer.path = ""
    c.tokenizer.vocab_size = 512  # tokenizer.path="toy" only: the size of the BPE vocab trained

    c.data = d = ConfigDict()
    d.train = ""  # comma-separated: a.jsonl, b.parquet, a load_from_disk dir, hf://name, or toy
    # A weighted mixture: "a.jsonl:0.7,b.jsonl:0.3"; per-source settings: a list written as a
    # string, '[{"path": "a.jsonl", "weight": 0.7, "format": "messages"}, ...]' (data/mixture.py)
    d.eval = ""  # same syntax ("toy" = the held-out toy split); "" = no evaluation data
    d.format = "auto"  # auto | text | prompt_completion | messages
    d.packing = "pack"  # pack | pad
    d.truncation = "truncate_left_prompt"  # | truncate_right | drop
    d.completion_only_loss = True  # loss on completions / assistant turns only
    d.seq_len = 4096
    d.shuffle_seed = 0
    d.prefetch_batches = 2  # batches assembled ahead in a thread, overlapping the step (0 = off)
    d.read_threads = 4  # threads reading and tokenising records, per process
    d.prefetch = 64  # records read ahead, per process
    d.worker_count = 0  # grain worker processes assembling batches (0 = in the training process)
    d.pack_bins = 0  # packing: rows filled at once (0 = twice the per-process batch size)
    d.cache_mb = 512  # tokenised examples kept per process, so later epochs skip the tokenizer (0 = off)
    # Every record is checked before the first step; bad ones stop the run with a list of them,
    # or with skip_invalid=True are left out and counted.
    d.skip_invalid = False
    # Duplicate training prompts and train/eval prompt overlap (exact and near) checked at
    # start-up and logged as a warning; training goes on (`alignjax data check`: full report).
    d.check_overlap = False

    # Device mesh; one axis may be -1 (= the remaining devices). Batches split over data*fsdp.
    # Multislice: dcn_* = how many slices (joined by the data-center network) an axis spans; the
    # sizes above are then per slice. E.g. dcn_data=2: data parallelism across two pods.
    c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1))
    c.sharding = ConfigDict()
    # None = alignjax.sharding.DEFAULT_RULES; else ((logical axis, mesh axes or None), ...).
    c.sharding.rules = None

    c.optimizer = o = ConfigDict()
    o.lr = 2e-5  # peak learning rate
    o.b1 = 0.9
    o.b2 = 0.95
    o.eps = 1e-8
    o.weight_decay = 0.0
    o.schedule = "cosine"  # cosine | linear | constant (after linear warmup)
    o.warmup_steps = 30
    o.min_lr_ratio = 0.1  # final lr = lr * min_lr_ratio (cosine and linear)
    o.grad_clip = 1.0  # global-norm clipping; 0 disables

    c.train = t = ConfigDict()
    t.steps = 1000
    t.epochs = 0.0  # > 0: the step budget is this many passes over data.train (replaces steps)
    t.batch_size = 64  # global sequences per optimizer step (all devices, all micro-batches)
    t.grad_accum_steps = 1  # micro-batches per step; each holds batch_size // grad_accum_steps
    t.seed = 0
    t.log_every = 10
    t.eval_every = 200  # 0 = no periodic evaluation
    t.eval_batches = 16
    t.eval_on_start = False  # also evaluate before the first step (the starting model's metrics, step 0)
    # Generation-based eval (alignjax.train.gen_eval): every N steps the policy answers held-out
    # prompts; logs eval/reward_mean, eval/response_length, eval/win_rate_vs_start. 0 = off.
    t.eval_generate_every = 0
    t.eval_generate_prompts = "toy"  # toy (held-out toy prompts) or a data file with a 'prompt' field
    t.eval_generate_num = 64  # prompts (the first N)
    t.eval_generate_max_new_tokens = 64
    t.eval_generate_temperature = 0.0  # 0 = greedy
    t.eval_generate_batch_size = 64
    t.eval_reward = ""  # reward spec for eval/reward_mean: toy, a reward-model dir, python:FILE:FN
    t.eval_judge = ""  # win-rate judge: toy, reward:DIR, llm:DIR; empty = the higher eval_reward wins
    t.nan_guard = True  # stop with an error (not a silent skip) on a non-finite loss

    c.checkpoint = k = ConfigDict()
    k.every = 200  # steps; the last step is always saved
    k.keep = 3
    k.async_save = True
    return c


def _tiny(c: ConfigDict) -> None:
    # ~0.8M parameters; learns the toy suite in a few minutes on a 2-core CPU: held-out checker
    # accuracy 86.5-97.5% over four runs (the 200-prompt eval and the run both vary).
    # The toy tokenizer has at most 512 tokens, so vocab_size=512 always fits it.
    c.model.update(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                   dtype="float32", remat_policy="none")
    c.tokenizer.path = "toy"
    c.data.update(train="toy", eval="toy", seq_len=128)
    c.optimizer.update(lr=3e-3, weight_decay=0.1, warmup_steps=40)
    c.train.update(steps=600, batch_size=32, log_every=25, eval_every=200, eval_batches=4)
    c.checkpoint.every = 200


def _small(c: ConfigDict) -> None:
    # ~9.8M parameters on the toy suite: a quick real run on one GPU (or a slow one on CPU).
    c.model.update(vocab_size=512, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                   num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=1024,
                   dtype="float32", remat_policy="none")
    c.tokenizer.path = "toy"
    c.data.update(train="toy", eval="toy", seq_len=256)
    c.optimizer.update(lr=1e-3, weight_decay=0.1, warmup_steps=60)
    c.train.update(steps=2000, batch_size=32, eval_every=250, eval_batches=8)
    c.checkpoint.every = 500


def _chat_data(c: ConfigDict, tokenizer: str) -> None:
    # Big presets: a real chat dataset (messages format) and a tokenizer with a chat template.
    # Fine-tuning starts from model.init_from (see each preset); with init_from="" the weights
    # are random, which only makes sense for compile / throughput checks.
    c.tokenizer.path = tokenizer
    c.data.update(train="hf://HuggingFaceH4/ultrachat_200k:train_sft",
                  eval="hf://HuggingFaceH4/ultrachat_200k:test_sft", format="messages")


def _llama2_7b(c: ConfigDict) -> None:
    # Set model.init_from=meta-llama/Llama-2-7b-hf (converted, or an HF snapshot dir) to fine-tune.
    c.model.update(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                   num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                   max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5,
                   remat_policy="dots")  # "full" if HBM is short (v4, v5e)
    _chat_data(c, "meta-llama/Llama-2-7b-chat-hf")
    c.data.seq_len = 4096
    c.mesh.update(data=1, fsdp=-1, tensor=1)  # pure FSDP: 7B in fp32 + Adam is ~108 GB total
    # `alignjax compile --topology v5p-64`: batch 64 x 4096 in one pass needs 96.5 GiB/chip with
    # remat "dots" (DOES NOT FIT); two accumulation steps halve the activations.
    c.train.update(steps=1000, batch_size=64, grad_accum_steps=2)
    c.optimizer.update(lr=2e-5, warmup_steps=30)


def _llama3_8b(c: ConfigDict) -> None:
    # Set model.init_from=meta-llama/Meta-Llama-3-8B (or -Instruct) to fine-tune.
    c.model.update(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                   num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                   max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                   remat_policy="dots")
    _chat_data(c, "meta-llama/Meta-Llama-3-8B-Instruct")
    c.data.seq_len = 4096
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    c.train.update(steps=1000, batch_size=128, grad_accum_steps=2)
    c.optimizer.update(lr=2e-5, warmup_steps=30)


def _llama3_70b(c: ConfigDict) -> None:
    # Set model.init_from=meta-llama/Meta-Llama-3-70B-Instruct to fine-tune. On 32 chips
    # (v5p-64) tensor=4 leaves fsdp=8: ~35 GB/chip of fp32 weights + Adam, activations on top.
    c.model.update(vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                   num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                   max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                   remat_policy="full")
    _chat_data(c, "meta-llama/Meta-Llama-3-70B-Instruct")
    c.data.seq_len = 4096
    c.mesh.update(data=1, fsdp=-1, tensor=4)
    c.train.update(steps=1000, batch_size=64, grad_accum_steps=4)
    c.optimizer.update(lr=2e-5, warmup_steps=30)


_APPLY = {"tiny": _tiny, "small": _small, "llama2_7b": _llama2_7b, "llama3_8b": _llama3_8b,
          "llama3_70b": _llama3_70b}


def get_config(preset: str | None = None) -> ConfigDict:
    """The SFT config for ``preset`` (default: tiny)."""
    preset = preset or DEFAULT_PRESET
    if preset not in _APPLY:
        raise ValueError(f"configs/sft.py: unknown preset {preset!r}; valid presets: "
                         f"{', '.join(PRESETS)}")
    c = base_config()
    _APPLY[preset](c)
    return c
