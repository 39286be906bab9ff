"""Pairwise judges for `alignjax eval winrate` and `alignjax eval judge`.

A judge answers, for each (instruction, first output, second output) in the order shown, a
verdict "A" (the first is better), "B" (the second) or "tie", or None for a reply that could
not be parsed (counted, never dropped). Three kinds, built from one spec by `build_judge`:

    toy          the toy checker scores each output alone (1 right / 0 wrong)
    reward:DIR   a reward model (scalar head) scores each output alone
    llm:DIR      a causal LM run locally (alignjax or HF dir) reads a judge prompt

The LLM judge's prompt templates (TEMPLATES) follow the strategies of LLMBar and MT-Bench in our
own words: `vanilla`; `rules` (the instruction comes first, no more and no less than asked, order
and length do not matter); `rules_metrics_reference` (the judge first writes up to three
instruction-specific questions and its own reference answer, then judges with the rules while
seeing them: LLMBar's strongest strategy); `mtbench` (a short explanation, then [[A]], [[B]] or
[[C]] for a tie).

Verdict modes of the LLM judge:
- "prob": one forward pass over prompt + the template's reply prefix; the next-token log-probs
  of the two label tokens give p(A) / (p(A) + p(B)) (winrate.probability_preference), a
  continuous preference as in AlpacaEval's weighted judge. Always parsed.
- "text": greedy generation, parsed by the template's format.

`compare` judges model-vs-baseline pairs in both orders by default: the MT-Bench rule (a pair is
won or lost only when both orders agree, else a tie) in text mode, the average of the two
orders' probabilities in probability mode. Scoring judges (toy, reward) read each output alone,
so the order cannot matter and one pass is enough.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Optional, Sequence

import numpy as np

from alignjax.errors import UserError
from alignjax.eval import winrate

VERDICT_MODES = ("prob", "text")

# ---- templates (pure) ---------------------------------------------------------------------------

_PAIR = """# Instruction
{instruction}

# Output (A)
{first}

# Output (B)
{second}"""

_ONE_LETTER = "Reply with one letter only: A if Output (A) is better, B if Output (B) is better."

_RULES = """Follow these rules, in this order of importance:
1. The output that carries out the instruction correctly wins. Correctness comes before tone, style or \
helpfulness.
2. It must give exactly what was asked: no more and no less. Unrequested additions, commentary and \
missing parts are faults.
3. Neither the position of an output (A or B) nor its length is a reason to prefer it: a longer or \
more polished output is not better for that alone."""

_VANILLA = "Which output responds better to the instruction below?\n\n" + _PAIR + "\n\n" + _ONE_LETTER

_RULES_PROMPT = ("Compare two outputs written for the same instruction and pick the better one.\n\n"
                 + _RULES + "\n\n" + _PAIR + "\n\n" + _ONE_LETTER)

_NOTES_PROMPT = """You will later compare answers to the instruction below. Prepare first.
Write at most three short questions that a correct answer to this exact instruction must pass, then \
write your own answer to the instruction.

# Instruction
{instruction}

Use this format:
Questions:
1. ...
Reference answer: ..."""

_RULES_NOTES_PROMPT = ("Compare two outputs written for the same instruction and pick the better one.\n\n"
                       + _RULES + "\n\n" + _PAIR + "\n\n"
                       "# Your preparation (questions to check and your own reference answer; it "
                       "may contain mistakes)\n{notes}\n\n"
                       "Check each output against the questions and the reference answer, then "
                       "apply the rules. " + _ONE_LETTER)

_MTBENCH = """You are an impartial referee. Two assistants answered the user's request below. Decide \
which answer follows the request more faithfully and answers it more accurately. Do not let the order \
of the answers, their length or the assistants' names affect your decision.
Explain your reasoning in one or two sentences, then end with your verdict in exactly this form: \
[[A]] if assistant A is better, [[B]] if assistant B is better, [[C]] if they are equally good.

## User request
{instruction}

## Answer of assistant A
{first}

## Answer of assistant B
{second}"""

_LETTER = re.compile(r"^\s*(?:output\s*)?[(\[]?\s*([AB])\s*[)\]]?(?![A-Za-z0-9])", re.IGNORECASE)
_BRACKETS = re.compile(r"\[\[\s*([ABC])\s*\]\]")


def parse_letter(reply: str) -> Optional[str]:
    """"A" / "B" from a reply that starts with the letter ("A", "B.", "(A)", "Output (b)");
    None for anything else (a sentence, an empty reply, another letter)."""
    m = _LETTER.match(reply or "")
    if m is None:
        return None
    letter = m.group(1)
    # a bare lowercase "a" opens English sentences ("a better answer..."): only "Output (a)" counts
    if letter.islower() and not re.match(r"^\s*output", reply, re.IGNORECASE):
        return None
    return letter.upper()


def parse_brackets(reply: str) -> Optional[str]:
    """MT-Bench format: the verdict [[A]] / [[B]] / [[C]] (tie) anywhere in the reply; None when
    there is none or the reply gives two different verdicts."""
    found = set(_BRACKETS.findall(reply or ""))
    if len(found) != 1:
        return None
    return {"A": "A", "B": "B", "C": "tie"}[found.pop()]


@dataclasses.dataclass(frozen=True)
class Template:
    name: str
    prompt: str  # placeholders {instruction}, {first}, {second} (and {notes} with a first stage)
    parse: callable
    reply_prefix: str = ""  # probability mode: the label is the next token after this
    notes_prompt: Optional[str] = None  # first stage (questions + reference answer), or None

    def render(self, instruction: str, first: str, second: str, notes: str = "") -> str:
        return self.prompt.format(instruction=instruction, first=first, second=second, notes=notes)


TEMPLATES = {
    "vanilla": Template("vanilla", _VANILLA, parse_letter),
    "rules": Template("rules", _RULES_PROMPT, parse_letter),
    "rules_metrics_reference": Template("rules_metrics_reference", _RULES_NOTES_PROMPT, parse_letter,
                                        notes_prompt=_NOTES_PROMPT),
    "mtbench": Template("mtbench", _MTBENCH, parse_brackets, reply_prefix="Verdict: [["),
}


def get_template(name: str, flag: str = "--template") -> Template:
    if name not in TEMPLATES:
        raise UserError(f"{flag} {name!r}: unknown judge template; choose from "
                        f"{', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def verdict_from_probability(p: float) -> str:
    return "A" if p > 0.5 else "B" if p < 0.5 else "tie"


# ---- judges -------------------------------------------------------------------------------------

class ScoreJudge:
    """Toy checker or reward model: each output is scored alone; the higher score wins."""

    order_matters = False

    def __init__(self, reward, name: str):
        self.reward, self.name = reward, name

    def verdicts(self, instructions, firsts, seconds):
        s1 = self.reward.score(list(instructions), list(firsts))
        s2 = self.reward.score(list(instructions), list(seconds))
        out = [verdict_from_probability(0.5 + 0.5 * np.sign(a - b)) for a, b in zip(s1, s2)]
        return dict(verdicts=out, probs=None, replies=None, scores=(s1, s2))


class LLMJudge:
    """A causal LM (LoadedModel with head "lm") reading `template`'s judge prompt."""

    order_matters = True

    def __init__(self, model, tokenizer, template: str = "rules", mode: str = "prob",
                 name: str = "llm", batch_size: int = 16, max_new_tokens: int = 128,
                 notes_max_new_tokens: int = 128, chat: Optional[bool] = None):
        if model.head != "lm":
            raise UserError(_not_lm_message(name))
        if mode not in VERDICT_MODES:
            raise UserError(f"--verdict {mode!r}: choose from {', '.join(VERDICT_MODES)}")
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.template, self.mode = get_template(template), mode
        self.batch_size, self.max_new_tokens = int(batch_size), int(max_new_tokens)
        self.notes_max_new_tokens = int(notes_max_new_tokens)
        self.chat = bool(tokenizer.chat_template) if chat is None else bool(chat)
        self._generator = None
        self._notes: dict[str, str] = {}
        self.label_ids = label_token_ids(tokenizer, self.template.reply_prefix)

    # prompts -> ids
    def encode(self, texts: Sequence[str], prefix: str = "") -> list[list[int]]:
        from alignjax.model.tokenize import encode_prompts
        ids = encode_prompts(self.tokenizer, texts, chat=self.chat)
        extra = self.tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix else []
        return [list(x) + list(extra) for x in ids]

    def generate(self, texts: Sequence[str], max_new_tokens: int) -> list[str]:
        from alignjax.model.generate import Generator, SamplingParams
        if self._generator is None:
            tok = self.tokenizer
            self._generator = Generator(self.model.module, self.model.mesh, self.model.rules,
                                        eos_ids=self.model.eos_ids(tok),
                                        pad_id=tok.pad_token_id if tok.pad_token_id is not None else 0)
        sp = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
        return self._generator.generate_texts(self.model.params, self.tokenizer, self.encode(texts), sp,
                                              self.batch_size)

    def notes(self, instructions: Sequence[str]) -> list[str]:
        """First stage of a two-stage template: the judge's questions and reference answer, one
        generation per distinct instruction (shared by both orders)."""
        todo = list(dict.fromkeys(i for i in instructions if i not in self._notes))
        if todo:
            prompts = [self.template.notes_prompt.format(instruction=i) for i in todo]
            self._notes.update(zip(todo, self.generate(prompts, self.notes_max_new_tokens)))
        return [self._notes[i] for i in instructions]

    def prompts(self, instructions, firsts, seconds) -> list[str]:
        notes = self.notes(instructions) if self.template.notes_prompt else [""] * len(instructions)
        return [self.template.render(i, a, b, n)
                for i, a, b, n in zip(instructions, firsts, seconds, notes)]

    def verdicts(self, instructions, firsts, seconds):
        prompts = self.prompts(instructions, firsts, seconds)
        if self.mode == "text":
            replies = self.generate(prompts, self.max_new_tokens)
            return dict(verdicts=[self.template.parse(r) for r in replies], probs=None,
                        replies=replies)
        logps = label_logps(self.model, self.encode(prompts, self.template.reply_prefix),
                            self.label_ids, self.batch_size)
        probs = winrate.probability_preference(logps[:, 0], logps[:, 1])
        return dict(verdicts=[verdict_from_probability(p) for p in probs], probs=probs, replies=None)


def _not_lm_message(path: str) -> str:
    return (f"--judge llm:{path}: a reward model (scalar head), not a causal LM; use --judge "
            f"reward:{path}, or give a causal LM to llm:")


def label_token_ids(tokenizer, prefix: str = "", labels=("A", "B")) -> tuple[int, int]:
    """The token each label starts with when it follows `prefix` in a reply."""
    base = tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix else []
    out = []
    for label in labels:
        ids = tokenizer(prefix + label, add_special_tokens=False)["input_ids"]
        if ids[:len(base)] == base and len(ids) > len(base):
            out.append(int(ids[len(base)]))
        else:  # the prefix merges with the label: take the label on its own
            out.append(int(tokenizer(label, add_special_tokens=False)["input_ids"][0]))
    if out[0] == out[1]:
        raise UserError(f"--judge: the judge tokenizer gives the labels {labels} the same first "
                        "token; use --verdict text")
    return tuple(out)


@functools.cache
def _label_logps_jit():
    import jax
    import jax.numpy as jnp
    from alignjax.model.llama import head_kernel

    def f(module, params, tokens, positions, segment_ids, last, label_ids):
        hidden, _ = module.apply(params, tokens, positions, segment_ids, output="hidden")
        h = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0].astype(jnp.float32)
        logits = h @ head_kernel(params, module.config).astype(jnp.float32)  # [B, V]
        return jax.nn.log_softmax(logits, axis=-1)[:, label_ids]
    return jax.jit(f, static_argnums=0)


def _bucket(n: int, smallest: int = 64) -> int:
    size = smallest
    while size < n:
        size *= 2
    return size


def label_logps(model, prompt_ids: Sequence[Sequence[int]], label_ids, batch_size: int = 16) -> np.ndarray:
    """[n, len(label_ids)] next-token log-probs of the labels after each prompt (one forward pass
    per batch; right padding, lengths bucketed to powers of two so few shapes compile)."""
    from alignjax import sharding as shd
    import jax.numpy as jnp
    if not prompt_ids:
        return np.zeros((0, len(label_ids)), np.float32)
    limit = model.config.max_position_embeddings
    longest = max(len(p) for p in prompt_ids)
    if longest > limit:
        i = max(range(len(prompt_ids)), key=lambda k: len(prompt_ids[k]))
        raise UserError(f"--judge: judge prompt {i} has {longest} tokens, more than the judge's "
                        f"max_position_embeddings {limit}; shorten the outputs, use a shorter "
                        "--template (vanilla is the shortest) or a judge with a longer context")
    dp = shd.axis_size(model.mesh, dict(model.rules).get("batch"))
    rows = -(-min(batch_size, len(prompt_ids)) // dp) * dp
    length = min(_bucket(longest), limit)
    out = []
    for s in range(0, len(prompt_ids), rows):
        chunk = list(prompt_ids[s:s + rows])
        real = len(chunk)
        chunk += [chunk[-1]] * (rows - real)
        tokens = np.zeros((rows, length), np.int32)
        seg = np.zeros((rows, length), np.int32)
        for r, ids in enumerate(chunk):
            tokens[r, :len(ids)], seg[r, :len(ids)] = ids, 1
        batch = dict(tokens=tokens, positions=np.tile(np.arange(length, dtype=np.int32), (rows, 1)),
                     segment_ids=seg, last=np.array([len(x) - 1 for x in chunk], np.int32))
        with shd.mesh_context(model.mesh, model.rules):
            b = shd.shard_batch(batch, model.mesh, model.rules)
            lp = _label_logps_jit()(model.module, model.params, b["tokens"], b["positions"],
                                    b["segment_ids"], b["last"], jnp.asarray(label_ids, jnp.int32))
        out.append(shd.to_host(lp).astype(np.float64)[:real])
    return np.concatenate(out)


def build_judge(spec: str, *, mesh=None, rules=None, template: str = "rules", mode: str = "prob",
                batch_size: int = 16, max_new_tokens: int = 128, seq_len: int = 1024):
    """A judge from `toy`, `reward:DIR` or `llm:DIR` (see the module docstring)."""
    from alignjax import rewards
    get_template(template)  # an unknown template is an error whatever the judge
    if spec == "toy":
        return ScoreJudge(rewards.build_reward("toy"), "toy")
    kind, sep, path = spec.partition(":")
    if not sep or kind not in ("reward", "llm") or not path:
        raise UserError(f"--judge {spec!r}: write toy, reward:DIR (a reward model) or llm:DIR (a "
                        "causal LM judge)")
    if kind == "reward":
        return ScoreJudge(rewards.build_reward([path], mesh=mesh, rules=rules, seq_len=seq_len,
                                               batch_size=batch_size, what="--judge reward:"),
                          spec)
    from alignjax import sharding as shd
    from alignjax.model.store import load_model
    from alignjax.model.tokenize import load_model_tokenizer
    if rewards.model_head(path, "--judge llm:") != "lm":
        raise UserError(_not_lm_message(path))
    model = load_model(path, mesh, rules or shd.DEFAULT_RULES, head="lm")
    return LLMJudge(model, load_model_tokenizer(model, path), template, mode, spec, batch_size,
                    max_new_tokens)


# ---- comparisons --------------------------------------------------------------------------------

def first_position_rate(verdicts: Sequence[Optional[str]]) -> float:
    """Share of decided verdicts (A or B) that pick the output shown first: 0.5 for no bias."""
    decided = [v for v in verdicts if v in ("A", "B")]
    return float(np.mean([v == "A" for v in decided])) if decided else float("nan")


def judge_both_orders(judge, instructions, firsts, seconds, order: str = "both") -> dict:
    """Verdicts for each pair as given (`first`) and, with order="both" and a judge that reads
    both outputs together, with the outputs swapped (`swapped`, in the swapped labels)."""
    if order not in ("both", "single"):
        raise UserError(f"--order {order!r}: choose both or single")
    a = judge.verdicts(instructions, firsts, seconds)
    b = (judge.verdicts(instructions, seconds, firsts) if order == "both" and judge.order_matters
         else None)
    return dict(first=a, swapped=b)


def compare(judge, instructions, outputs_model, outputs_baseline, order: str = "both") -> dict:
    """Model preferences (1 win / 0.5 tie / 0 loss, a probability in probability mode, None when
    unparsed) and the judge's details: positional consistency, first-position rate, unparsed
    replies."""
    runs = judge_both_orders(judge, instructions, outputs_model, outputs_baseline, order)
    a, b = runs["first"], runs["swapped"]
    if b is None:
        prefs = (list(a["probs"]) if a["probs"] is not None else
                 [None if v is None else winrate._PREF[v] for v in a["verdicts"]])
    elif a["probs"] is not None:
        prefs = list(winrate.combine_probabilities(a["probs"], b["probs"]))
    else:
        prefs = winrate.combine_both_orders(a["verdicts"], b["verdicts"])
    replies = a["verdicts"] + (b["verdicts"] if b is not None else [])
    details = dict(judge=judge.name, order="both" if b is not None else "single",
                   mode=getattr(judge, "mode", "score"),
                   template=judge.template.name if hasattr(judge, "template") else None,
                   judgements=len(replies), unparsed_replies=sum(v is None for v in replies),
                   positional_consistency=(winrate.positional_consistency(a["verdicts"], b["verdicts"])
                                           if b is not None else None),
                   first_position_rate=first_position_rate(replies) if judge.order_matters else None)
    return dict(prefs=[None if p is None else float(p) for p in prefs], details=details, runs=runs)
