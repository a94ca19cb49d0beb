"""`llmkit explain VIEW`: the article's intuitions as pictures, on any model llmkit loads (registered by
llmkit.cli). Each view writes VIEW.json, VIEW.png and a self-contained VIEW.html into --out and prints
what it found; a view that does not apply to the model (attention on RWKV) is one error line saying why.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

VIEW_HELP = ("tokens: text → BPE pieces and ids; attention: per layer/head maps, heads ranked for --query/--keys; "
             "knockout: remove heads or edges, Δ log p of --predict; sampling: each stage of the sampling chain "
             "per generated token; logit-lens: the next-token guess after every layer; cache: KV-cache bytes for "
             "the model's layout; positions: RoPE / ALiBi / T5 / learned position effects; compare: --view for "
             "--model and --other side by side")


def parse_head(text: str) -> tuple[int, int | None]:
    """'L.H' → (L, H); 'L' or 'L.*' → (L, None), every head of layer L."""
    layer, _, head = text.partition(".")
    try:
        return int(layer), (None if head in ("", "*") else int(head))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LAYER.HEAD (e.g. 3.1) or LAYER.* , got {text!r}") from None


def parse_edge(text: str) -> tuple[str, str]:
    query, sep, key = text.partition(":")
    if not sep or not query or not key:
        raise argparse.ArgumentTypeError(f"expected QUERY:KEY words (e.g. 坐:猫), got {text!r}")
    return query, key


def view_options(view: str, args: argparse.Namespace) -> dict:
    from llmkit.commands.generation import sampling_from

    keys = [k for k in (getattr(args, "keys", None) or "").split(",") if k] or None
    top = {} if getattr(args, "top", None) is None else {"top": args.top}
    if view == "attention":
        return dict(query=args.query, keys=keys, **top)
    if view == "knockout":
        return dict(heads=args.head, edges=args.edge, predict=args.predict, query=args.query, keys=keys,
                    every_head=args.every_head, **top)
    if view == "sampling":
        return dict(max_new_tokens=args.max_new_tokens, seed=args.seed, stop=args.stop or (), **sampling_from(args))
    if view == "cache":
        return dict(context=args.context)
    if view == "positions":
        layer, head = (args.head or [(0, 0)])[0]
        return dict(layer=layer, head=head or 0)
    return {}


def check_view_flags(view: str, args: argparse.Namespace) -> None:
    """The values argparse cannot check alone, refused before anything is loaded (the server's /explain
    checks its query parameters with this too)."""
    from llmkit.errors import ConfigError

    if getattr(args, "top", None) is not None and not 1 <= args.top <= 10_000:
        raise ConfigError(f"--top must be in [1, 10000], got {args.top}")
    if getattr(args, "context", None) is not None and not 1 <= args.context <= 1 << 24:
        raise ConfigError(f"--context must be in [1, {1 << 24}], got {args.context}")
    if getattr(args, "tuned_steps", None) is not None and not 1 <= args.tuned_steps <= 1_000_000:
        raise ConfigError(f"--tuned-steps must be in [1, 1000000], got {args.tuned_steps}")
    if view == "sampling":
        from llmkit.commands.generation import sampling_from
        from llmkit.inference.sampling import SamplingParams

        SamplingParams(**sampling_from(args))


def cmd_explain(args: argparse.Namespace) -> None:
    """Run one view (or compare two models on one) and write its JSON, PNG and HTML."""
    from llmkit.commands.generation import default_chat_model
    from llmkit.commands.speed import check_text_flags, load_for_generation
    from llmkit.explain import run_view
    from llmkit.explain.figures import cjk_font
    from llmkit.explain.page import write_view
    from llmkit.explain.subject import Subject

    view = args.other_view if args.view == "compare" else args.view
    check_view_flags(view, args)
    args.prompt = args.text
    check_text_flags(args)
    options = view_options(view, args)
    model_path = Path(args.model or default_chat_model())
    lm = load_for_generation(model_path, args)
    subject = Subject.create(lm, args.text, target=args.target, label=model_path.name)
    if args.view == "compare":
        from llmkit.explain.compare import compare_view

        other_args = argparse.Namespace(**{**vars(args), "quantize": args.other_quantize or args.quantize,
                                           "dtype": args.other_dtype or args.dtype})
        other_path = Path(args.other) if args.other else model_path
        other_lm = load_for_generation(other_path, other_args)
        left_name, right_name = _side_names(args, model_path.name, lm, other_path.name, other_lm)
        subject.label = left_name
        other = Subject.create(other_lm, args.text, target=args.target, label=right_name)
        result = compare_view(run_view(view, subject, **options), run_view(view, other, **options),
                              left_name, right_name)
    else:
        if view == "logit-lens" and args.tuned:
            options["tuned"] = _tuned_lens(lm, args)
        result = run_view(view, subject, **options)
    written = write_view(result, args.out)
    for line in result.lines:
        print(line)
    font, why = cjk_font()
    if font is None and written.get("png"):
        print(f"warning: {why}", file=sys.stderr)
    print("wrote " + ", ".join(str(p) for p in written.values()), file=sys.stderr)


def _tuned_lens(lm, args: argparse.Namespace):
    """The tuned lens of --tuned: trained (or resumed, or reloaded) in OUT/tuned-lens by the training loop."""
    from llmkit.commands.progress import Progress
    from llmkit.explain.tuned_lens import default_texts, fit_tuned_lens, read_texts

    texts, data = read_texts(args.tuned_data) if args.tuned_data else default_texts()
    progress = Progress()
    try:
        return fit_tuned_lens(lm, Path(args.out) / "tuned-lens", steps=args.tuned_steps, texts=texts, data=data,
                              on_event=progress.on_event, on_step=progress.on_step)
    finally:
        progress.close()


def _side_names(args: argparse.Namespace, left: str, lm, right: str, other_lm) -> tuple[str, str]:
    if left == right:  # the same file: the two sides differ by precision or weights' format
        left += f" ({lm.runtime.dtype}{_quantised(lm)})"
        right += f" ({other_lm.runtime.dtype}{_quantised(other_lm)})"
    return left, right


def _quantised(lm) -> str:
    """", int4" where any layer holds quantised weights (--quantize int4, or a GGUF's kept blocks)."""
    from llmkit.layers.quantized import is_quantized

    return ", int4" if any(is_quantized(m) for m in lm.model.modules()) else ""


VIEWS = ("tokens", "attention", "knockout", "sampling", "logit-lens", "cache", "positions", "compare")


def _focus_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--query", default=None, metavar="WORD",
                   help="the word whose attention is ranked (default for the article's sentence: 坐; for "
                        "'The cat sat on the mat.': sat)")
    p.add_argument("--keys", default=None, metavar="W1,W2",
                   help="the words it should attend to (default: 猫,垫子 / cat,mat)")


def _top_flag(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--top", type=int, default=None, metavar="N", help=what)


def _knockout_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--edge", type=parse_edge, action="append", metavar="Q:K",
                   help="remove the attention of word Q to word K in every layer and head (repeatable)")
    p.add_argument("--predict", default=None, metavar="WORD",
                   help="the word whose prediction is measured (default: 垫子 / mat, else the last token)")
    p.add_argument("--every-head", action="store_true",
                   help="also remove every head alone and map the effect (one batched forward per layer)")


def _head_flag(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--head", type=parse_head, action="append", metavar="L.H", help=what)


def _view_flags(view: str, p: argparse.ArgumentParser) -> None:
    """The flags view `view` reads (compare reads those of every view it may compare)."""
    from llmkit.commands.generation import add_sampling_flags

    if view in ("attention", "knockout", "compare"):
        _focus_flags(p)
        _top_flag(p, "attention: heads shown (default 8); knockout: ranked heads removed (default 3)")
    if view in ("knockout", "compare"):
        _knockout_flags(p)
    if view in ("knockout", "positions", "compare"):
        _head_flag(p, "knockout: a head to remove (L.* = every head of layer L; repeatable; default: the --top "
                      "heads ranked for --query/--keys); positions: the RoPE head to plot (default 0.0)")
    if view in ("sampling", "compare"):
        add_sampling_flags(p, max_new_tokens=8)
    if view in ("cache", "compare"):
        p.add_argument("--context", type=int, default=None, metavar="N",
                       help="the context length to size the cache for (default: the model's)")
    if view == "logit-lens":
        p.add_argument("--tuned", action="store_true",
                       help="also train a tuned lens (one affine map per layer, the one training loop, KL to the "
                            "model's own distribution; kept in OUT/tuned-lens and reused) and show it beside")
        p.add_argument("--tuned-steps", type=int, default=200, metavar="N",
                       help="--tuned: optimizer steps of 4 × 128 tokens (default: 200)")
        p.add_argument("--tuned-data", action="append", metavar="PATH",
                       help="--tuned: text files or directories to train on (repeatable; default: the Python "
                            "standard library's top-level modules); a tenth is held out")
    if view == "compare":
        p.add_argument("--view", dest="other_view", default="attention", choices=VIEWS[:-1],
                       help="which view (default: attention)")
        p.add_argument("--other", default=None, metavar="PATH", help="the second model (default: --model)")
        p.add_argument("--other-quantize", choices=("auto", "none", "int4"), default=None,
                       help="--quantize for the second model (e.g. fp32 against int4)")
        p.add_argument("--other-dtype", default=None, choices=("auto", "fp32", "bf16", "fp16"),
                       help="--dtype for the second model")


VIEW_SUMMARIES = {
    "tokens": "text → byte-level BPE pieces and ids, CJK shown as characters",
    "attention": "per layer and head maps; heads ranked by how much --query attends to --keys",
    "knockout": "remove heads or edges and show Δ log p of --predict",
    "sampling": "each stage of the sampling chain at every generated token",
    "logit-lens": "the next-token guess read out after every layer",
    "cache": "KV-cache bytes by layer for the model's own layout, against a full multi-head cache",
    "positions": "RoPE score against offset, ALiBi slopes, T5 buckets, learned tables",
    "compare": "one view (--view) for --model and --other side by side",
}


def register(sub: argparse._SubParsersAction) -> None:
    """Add `explain VIEW` to the `llmkit` parser: one sub-command per view, each with only its own flags."""
    from llmkit.commands.speed import add_speed_flags

    p = sub.add_parser("explain", help="see inside a model: tokens, attention, knockout, sampling, logit lens, "
                                       "cache, positions (JSON + PNG + offline HTML)",
                       description="Draw one of the article's intuitions on a real model. " + VIEW_HELP)
    views = p.add_subparsers(dest="view", required=True, metavar="VIEW")
    for view in VIEWS:
        v = views.add_parser(view, help=VIEW_SUMMARIES[view], description=VIEW_SUMMARIES[view])
        v.add_argument("--model", default=None, metavar="PATH",
                       help="a run, checkpoint, Hugging Face directory or .gguf (default: SmolLM2-135M-Instruct)")
        v.add_argument("--text", default="猫坐在垫子上", help="the sentence to look at (default: 猫坐在垫子上)")
        v.add_argument("--target", default=None, metavar="TEXT",
                       help="encoder-decoder models: the decoder's text (default: the same as --text)")
        v.add_argument("--out", default="runs/explain", metavar="DIR",
                       help="where VIEW.json/.png/.html go (default: runs/explain)")
        _view_flags(view, v)
        add_speed_flags(v)
        # A view is a measurement: fp32 unless asked (auto may pick bf16, whose maps differ by machine).
        dtype = next(a for a in v._actions if a.dest == "dtype")
        dtype.help = dtype.help.replace("(default: auto)", "(default here: fp32; give the same --dtype to "
                                                             "`llmkit generate` to compare samples)")
        # ... and on the file's weights in full precision (a GGUF's kept blocks round its scales to bf16)
        quantize = next(a for a in v._actions if a.dest == "quantize")
        quantize.help = quantize.help.replace("(default: auto)", "(default here: none)")
        v.set_defaults(handler=cmd_explain, dtype="fp32", quantize="none")
