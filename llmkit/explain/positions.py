"""The positions view: how each scheme makes attention depend on order.

- RoPE: the score q·k of one head's real query and key vectors (from the text) as the distance between
  them grows, from the model's own rotation (frequencies and scaling included), beside q = k = all
  ones, whose score decays with distance (Su et al. 2021, §3.4.3);
- ALiBi: the bias −slope·distance each head adds;
- T5: the distance buckets and each head's learned bias per distance;
- learned / sinusoidal tables: the cosine similarity between positions' vectors.
"""

from __future__ import annotations

import torch

from llmkit.errors import ConfigError
from llmkit.explain.page import ViewResult
from llmkit.explain.pieces import positions_of
from llmkit.explain.subject import FOCUS, Subject
from llmkit.layers.position import alibi_slopes, apply_rope, relative_position_bucket, rope_cos_sin

INTUITION = ("自注意力机制本身不包含位置信息，需要额外的位置编码: attention itself has no notion of order; a position "
             "scheme makes the score depend on where tokens are (RoPE: 通过旋转矩阵编码相对位置).")


def stack_of(model):
    return model.decoder if model.cfg.arch == "encoder-decoder" else (model.stack if hasattr(model, "stack") else None)


def positions_view(subject: Subject, *, layer: int = 0, head: int = 0, span: int | None = None) -> ViewResult:
    cfg = subject.cfg
    if cfg.body != "transformer":
        raise ConfigError(f"positions: {subject.name} is {cfg.body.upper()}: it has no position encoding; "
                          "the recurrence itself orders the tokens")
    if cfg.position == "none":
        raise ConfigError(f"positions: {subject.name} uses no position encoding (position='none')")
    span = span or min(cfg.max_seq_len, 1024)
    kind = cfg.position
    if kind == "rope":
        data, draw, lines = _rope(subject, layer, head, span)
    elif kind == "alibi":
        data, draw, lines = _alibi(cfg, min(span, 128))
    elif kind == "relative":
        data, draw, lines = _t5(subject, min(span, 2 * cfg.relative_max_distance))
    else:
        data, draw, lines = _absolute(subject, min(span, 128))
    data = {"model": subject.name, "scheme": kind, **data}
    return ViewResult("positions", f"Positions ({kind}): {subject.name}", INTUITION, data, draw, lines=lines)


@torch.inference_mode()
def _rope(subject: Subject, layer: int, head: int, span: int):
    model, cfg = subject.model, subject.cfg
    stack = stack_of(model)
    if not (0 <= layer < len(stack.blocks)) or not (0 <= head < cfg.n_heads):
        raise ConfigError(f"--layer/--head: the model has {len(stack.blocks)} layers of {cfg.n_heads} heads")
    attn = stack.blocks[layer].attn
    seen = []
    hook = attn.register_forward_pre_hook(lambda module, args: seen.append(args[0]) if not seen else None)
    try:
        subject.run()
    finally:
        hook.remove()
    x = seen[0]  # (1, T, C): the attention's input
    q, k, _ = attn.project_qkv(x, None)  # before the rotation
    q, k = q[0, head].float(), k[0, head // (cfg.n_heads // cfg.n_kv_heads)].float()  # (T, D)
    query, keys = FOCUS.get(subject.text, (None, ()))
    qi = (positions_of(subject.pieces, subject.text, query) or [len(subject.pieces) - 1])[-1]
    ki = (positions_of(subject.pieces, subject.text, keys[0]) if keys else [0])[-1]
    offsets = torch.arange(span)
    cos, sin = rope_cos_sin(offsets[None], stack.inv_freq, torch.float32, scale=stack.rope_scale)
    scale = attn.scale if attn.scale is not None else cfg.head_dim ** -0.5

    def score(qv, kv):  # query at position m, key at position 0: depends on m only
        rotated_q = apply_rope(qv.expand(span, -1)[None, None], cos, sin)[0, 0]
        rotated_k = apply_rope(kv[None, None, None], cos[:, :, :1], sin[:, :, :1])[0, 0, 0]
        return (rotated_q @ rotated_k * scale).tolist()

    real = score(q[qi], k[ki])
    ones = score(torch.ones(cfg.head_dim), torch.ones(cfg.head_dim))
    labels = (subject.pieces[qi].label, subject.pieces[ki].label)
    lines = [f"RoPE θ={cfg.rope_theta:g} ({cfg.rope_scaling} scaling), layer {layer} head {head}: score of "
             f"q({labels[0]})·k({labels[1]}) at offset 0: {real[0]:.3f}, max over 0..{span - 1}: {max(real):.3f} "
             f"at {real.index(max(real))}, min {min(real):.3f} at {real.index(min(real))}"]

    def draw(plt):
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6))
        a.plot(range(span), real, color="#4C72B0", linewidth=1)
        a.set_title(f"layer {layer} head {head}: q({labels[0]})·k({labels[1]}) moved apart", fontsize=9)
        a.set_xlabel("query position − key position")
        a.set_ylabel("attention score")
        b.plot(range(span), ones, color="#DD8452", linewidth=1)
        b.set_title("q = k = all ones: the score decays with distance", fontsize=9)
        b.set_xlabel("query position − key position")
        return fig

    return {"layer": layer, "head": head, "query": labels[0], "key": labels[1], "offsets": list(range(span)),
            "score": real, "score_all_ones": ones, "rope_theta": cfg.rope_theta}, draw, lines


def _alibi(cfg, span: int):
    slopes = alibi_slopes(cfg.n_heads).tolist()
    lines = [f"ALiBi: {cfg.n_heads} heads, slopes " + " ".join(f"{s:.4g}" for s in slopes)]

    def draw(plt):
        fig, ax = plt.subplots(figsize=(7, 3.8))
        for h, s in enumerate(slopes):
            ax.plot(range(span), [-s * d for d in range(span)], label=f"head {h}", linewidth=1)
        ax.set_xlabel("distance |i − j|")
        ax.set_ylabel("bias added to the score")
        ax.legend(fontsize=6, ncol=2)
        ax.set_title("ALiBi: each head's linear penalty on distance", fontsize=9)
        return fig

    return {"slopes": slopes, "distances": list(range(span))}, draw, lines


def _t5(subject: Subject, span: int):
    cfg = subject.cfg
    table = (subject.model.encoder if cfg.arch == "encoder-decoder" else stack_of(subject.model)).relative_bias.weight
    distance = torch.arange(-span, span + 1)
    buckets = relative_position_bucket(distance, bidirectional=True, buckets=cfg.relative_buckets,
                                       max_distance=cfg.relative_max_distance)
    bias = table.detach().float()[buckets].T.tolist()  # (H, distances)
    lines = [f"T5 relative buckets: {cfg.relative_buckets} buckets up to distance {cfg.relative_max_distance} "
             f"(encoder, both directions); distances {-span}..{span} use {len(set(buckets.tolist()))} of them"]

    def draw(plt):
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6))
        a.step(distance.tolist(), buckets.tolist(), where="mid", color="#4C72B0")
        a.set_xlabel("key position − query position")
        a.set_ylabel("bucket")
        a.set_title("T5 buckets: exact near, logarithmic far", fontsize=9)
        for h, row in enumerate(bias):
            b.plot(distance.tolist(), row, linewidth=1, label=f"head {h}")
        b.set_xlabel("key position − query position")
        b.set_ylabel("learned bias")
        b.legend(fontsize=6, ncol=2)
        b.set_title("encoder layer-0 bias per head", fontsize=9)
        return fig

    return {"distances": distance.tolist(), "buckets": buckets.tolist(), "bias": bias}, draw, lines


def _absolute(subject: Subject, span: int):
    embeddings = subject.model.embeddings
    if subject.cfg.position == "learned":
        table = embeddings.pos_embed.weight[embeddings.position_offset:embeddings.position_offset + span]
    else:
        table = embeddings.sinusoid[:span]
    table = torch.nn.functional.normalize(table.detach().float(), dim=-1)
    similarity = (table @ table.T).tolist()
    lines = [f"{subject.cfg.position} positions: cosine similarity of positions 0..{span - 1}'s vectors; "
             f"neighbours {sum(similarity[i][i + 1] for i in range(span - 1)) / (span - 1):.3f} on average"]

    def draw(plt):
        fig, ax = plt.subplots(figsize=(5.5, 4.6))
        image = ax.imshow(similarity, cmap="viridis")
        fig.colorbar(image, ax=ax)
        ax.set_xlabel("position")
        ax.set_ylabel("position")
        ax.set_title(f"{subject.cfg.position} position vectors: cosine similarity", fontsize=9)
        return fig

    return {"similarity": similarity}, draw, lines
