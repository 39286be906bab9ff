"""The decode loop writes only the new token's K/V into the KV cache: no per-token cache copy.

Inspects the optimised HLO of a real Generator bucket (not a timing test). Inside the loops (every
computation but ENTRY), an instruction that produces a buffer as large as one layer's cache
(B * kv * S * d elements, in any shape or layout) may only pass it along (parameter,
get-tuple-element, bitcast) or update it in place with a dynamic-update-slice of one token; a copy,
a transpose, a slice, a fresh broadcast or a rewrite of a layer's cache inside the loop fails.
Two earlier engines fail it: the layer scan (cache as scanned input, new cache as stacked output)
rebuilt the stacked cache at every token, and a stacked [layers, B, S, kv, d] cache made XLA slice
out each layer's cache and transpose its K and V for the attention dots at every token, which is
why tokens/s stopped growing with batch.

The attention dots inside the loop must also read each cached buffer as a plain [K, N] matrix
(contracting its second-to-last axis): with keys stored [S, d], q @ k^T contracted the minor axis
and XLA:CPU ran it about 3x slower, the largest cost of a decode step at batch 64.
"""

import math
import re

import jax
import numpy as np
import pytest

from alignjax import sharding as shd
from alignjax.model.config import LlamaConfig
from alignjax.model.generate import Generator, SamplingParams
from alignjax.model.params import build_module, init_params

_HEADER = re.compile(r"^(ENTRY )?%(\S+) .*\{$")
_INSTR = re.compile(r"^\s*(ROOT )?%(\S+) = (\w+\[[\d,]*\])(?:\{[^}]*\})? ([\w-]+)\((.*)$")


def _dims(shape: str) -> tuple:
    inside = shape[shape.index("[") + 1:-1]
    return tuple(int(x) for x in inside.split(",") if x)


def parse_hlo(text: str) -> dict:
    """{computation: dict(root, instrs={name: (dims, opcode, rest)}, calls={computations})}."""
    comps, cur = {}, None
    for line in text.splitlines():
        if m := _HEADER.match(line):
            cur = comps[m.group(2)] = dict(root=None, instrs={}, calls=set(), lines=[])
        elif line.startswith("}"):
            cur = None
        elif cur is not None:
            cur["lines"].append(line)
            if m := _INSTR.match(line):
                cur["instrs"][m.group(2)] = (_dims(m.group(3)), m.group(4), m.group(5))
                if m.group(1):
                    cur["root"] = m.group(2)
    for comp in comps.values():
        comp["calls"] = {n for line in comp.pop("lines") for n in re.findall(r"%([\w.\-]+)", line)
                         if n in comps}
    return comps


def _inside_loops(text: str, comps: dict) -> set:
    """Every computation a while-loop body runs, directly or through calls and fusions."""
    todo = [n for n in re.findall(r"body=%([\w.\-]+)", text)]
    seen = set()
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo += comps[n]["calls"]
    return seen


def cache_rewrites(text: str, layer_elems: int, token_elems: int) -> tuple[list, int]:
    """(offending instructions inside loops, number of in-place single-token cache writes)."""
    comps = parse_hlo(text)
    bad, token_writes = [], 0
    for cname in _inside_loops(text, comps):  # the initial zeros (ENTRY) happen once per call
        comp = comps[cname]
        for name, (dims, op, rest) in comp["instrs"].items():
            if math.prod(dims) < layer_elems or op in ("parameter", "get-tuple-element", "bitcast",
                                                       "tuple"):
                continue
            if op == "fusion":
                called = re.search(r"calls=%([\w.\-]+)", rest).group(1)
                root = comps[called]["instrs"][comps[called]["root"]]
                if root[1] != "dynamic-update-slice":
                    bad.append(f"{cname}: {name} {dims} = fusion with root {root[1]}")
                continue  # the fused dynamic-update-slice itself is checked below
            if op == "dynamic-update-slice":
                update = re.findall(r"%([\w.\-]+)", rest)[1]
                n = math.prod(comp["instrs"][update][0])
                if n > token_elems:
                    bad.append(f"{cname}: {name} rewrites {n} elements (one token is {token_elems})")
                token_writes += n == token_elems
                continue
            bad.append(f"{cname}: {name} {dims} = {op}")
    return bad, token_writes


def transposed_cache_dots(text: str, layer_elems: int) -> tuple[list, int]:
    """(dots inside loops that contract a layer-cache-sized operand on its minor axis, number of
    dots on a layer-cache-sized operand)."""
    comps = parse_hlo(text)
    bad, cache_dots = [], 0
    for cname in _inside_loops(text, comps):
        instrs = comps[cname]["instrs"]
        for name, (dims, op, rest) in instrs.items():
            if op != "dot":
                continue
            operands = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
            for side, operand in zip(("lhs", "rhs"), operands):
                odims = instrs[operand][0]
                contracting = re.search(side + r"_contracting_dims=\{([\d,]*)\}", rest).group(1)
                if math.prod(odims) != layer_elems:
                    continue
                cache_dots += 1
                if contracting != str(len(odims) - 2):
                    bad.append(f"{cname}: {name} contracts {side} {operand} {odims} on axis {contracting}")
    return bad, cache_dots


@pytest.mark.slow  # ~10 s of compiles: out of the 5-minute fast tier
def test_decode_loop_writes_the_cache_in_place():
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, dtype="float32")
    mesh = shd.make_mesh(devices=jax.devices()[:1])
    module = build_module(cfg)
    params = init_params(module, jax.random.PRNGKey(0), mesh)
    gen = Generator(module, mesh, prompt_buckets=(16,))
    tokens = np.ones((2, 16), np.int32)
    for sp in (SamplingParams(max_new_tokens=8, temperature=0.0),
               SamplingParams(max_new_tokens=8, temperature=0.7, top_k=5, top_p=0.9)):
        text = gen.lower(params, tokens, np.ones_like(tokens), sp).compile().as_text()
        b, kv, s, d = 2, 2, 16 + 8, 8
        bad, token_writes = cache_rewrites(text, layer_elems=b * kv * s * d, token_elems=b * kv * d)
        assert not bad, "\n".join(bad)
        transposed, cache_dots = transposed_cache_dots(text, layer_elems=b * kv * s * d)
        assert not transposed, "\n".join(transposed)
        assert cache_dots >= 2 * 3  # q @ k and probs @ v in each layer
        assert token_writes >= 2 * 3  # K and V of the decoded token, into each layer's cache
