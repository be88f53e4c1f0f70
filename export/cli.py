"""``lstmd-export``: train, export to ONNX, verify, and build the n-gram baseline."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lstmd._extras import missing_extra
from lstmd.export.errors import ExportError
from lstmd.model.tokenizer import INITIAL, KINDS, Tokenizer, TokenizerSpec, Vocab

if TYPE_CHECKING:
    import torch

DEFAULT_CORPUS = str(Path(__file__).parent / "data" / "pd-english")


def _parser(sub: argparse._SubParsersAction, name: str, help: str) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=help, description=help, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    return parser


def _add_train(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from lstmd.export.run_tokenizer import TRAIN_KINDS

    p = _parser(sub, "train", "train an LSTM language model")
    p.add_argument("--corpus", default=DEFAULT_CORPUS, help="text file or folder of .txt/.txt.gz files")
    p.add_argument("--split", nargs=3, metavar=("TRAIN", "VALID", "TEST"),
                   help="a fixed split, three files used as is (instead of --corpus split by document)")  # fmt: skip
    p.add_argument("--out", required=True, help="work folder: tokenizer, split, checkpoints, report")
    t = p.add_argument_group("tokenizer", "how text becomes tokens; recorded in OUT for the baseline and the export")
    t.add_argument("--tokenizer", choices=TRAIN_KINDS, default="words",
                   help="words: lstmd's word tokenizer (lowercased); whitespace: already-tokenized text, case kept; "
                   "characters: one token per character; bpe, unigram: a subword tokenizer trained on the training "
                   "split with the tokenizers library (OUT/tokenizer.json)")  # fmt: skip
    t.add_argument("--keep-case", action="store_true", help="words: keep case (The and the are different words)")
    t.add_argument("--lowercase", action="store_true", help="whitespace, characters, bpe, unigram: fold to lower case")
    v = t.add_mutually_exclusive_group()
    v.add_argument(
        "--vocab-size", type=int, default=10000, help="keep the most frequent tokens (<unk>, <eos> included)"
    )
    v.add_argument("--min-count", type=int, default=0, help="instead, keep tokens seen this often; the rest is <unk>")
    v.add_argument("--vocab", help="instead, this vocabulary: one token per line, <unk> (and <eos>) among them")
    t.add_argument("--subword-vocab-size", type=int, default=8000, help="bpe, unigram: the tokenizer's size")
    p.add_argument("--embed-size", type=int, default=256)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.3)
    p.add_argument("--no-tie-weights", action="store_true", help="separate decoder weights")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--bptt", type=int, default=35, help="truncated BPTT window (tokens)")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (quartered on a plateau)")
    p.add_argument("--clip", type=float, default=0.25, help="gradient norm clip")
    p.add_argument("--epochs", type=int, default=40, help="most epochs")
    p.add_argument("--patience", type=int, default=2, help="epochs without improvement before stopping")
    p.add_argument("--max-minutes", type=float, default=0.0, help="time budget, checked between batches (0: none)")
    p.add_argument("--max-train-tokens", type=int, default=0, help="use only this many tokens (smoke runs)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")


def _run_train(args: argparse.Namespace) -> None:
    from lstmd.export.train import TrainConfig, train

    cfg = TrainConfig(
        corpus=args.corpus,
        out_dir=args.out,
        vocab_size=args.vocab_size,
        tokenizer=args.tokenizer,
        keep_case=args.keep_case,
        lowercase=args.lowercase,
        vocab_file=args.vocab or "",
        min_count=args.min_count,
        subword_vocab_size=args.subword_vocab_size,
        split_files=args.split or [],
        batch_size=args.batch_size,
        bptt=args.bptt,
        lr=args.lr,
        clip=args.clip,
        max_epochs=args.epochs,
        patience=args.patience,
        max_minutes=args.max_minutes,
        max_train_tokens=args.max_train_tokens,
        seed=args.seed,
        threads=args.threads,
        model={
            "embed_size": args.embed_size,
            "hidden_size": args.hidden_size,
            "num_layers": args.layers,
            "dropout": args.dropout,
            "tie_weights": not args.no_tie_weights,
        },
    )
    report = train(cfg, resume=args.resume)
    print(json.dumps({k: report[k] for k in ("valid_ppl", "test_ppl", "valid", "test", "training_minutes")}))


def _add_model_source(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        required=True,
        help="PyTorch checkpoint (lstmd-export train's best.pt, a state dict, or a pickled module)",
    )
    p.add_argument(
        "--model-class", help="module:Class or file.py:Class of your model, when the checkpoint is a state dict"
    )
    p.add_argument("--model-kwargs", default="{}", help="JSON keyword arguments for --model-class")
    p.add_argument(
        "--adapter",
        choices=["time-major-logsoftmax", "batch-first-logits"],
        help="wrap a model with another forward interface (see lstmd.export.adapters): time-major-logsoftmax "
        "for pytorch/examples' word_language_model RNNModel, batch-first-logits for other argument names",
    )
    p.add_argument("--adapter-kwargs", default="{}", help="JSON keyword arguments for --adapter")
    p.add_argument("--vocab", help="vocabulary file: one token per line (the words, whitespace and characters kinds)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed absolute difference")
    c = p.add_argument_group("text check", "the folder's tokenizer on your own sample text (lstmd.export.text_check)")
    c.add_argument("--text", help="your sample text, a file or folder: the real-input parity check and the text "
                   "check (without it, parity runs on lstmd's bundled English sample and only the vocabulary "
                   "is checked)")  # fmt: skip
    c.add_argument("--text-ids", help="the ids your own pipeline made for --text: whitespace-separated ints, "
                   "one line per line of --text, or the whole text on one line")  # fmt: skip
    c.add_argument("--max-unknown", type=float, default=0.05,
                   help="warn when more of the sample's tokens than this share become the unknown token")  # fmt: skip
    c.add_argument("--max-unreachable", type=float, default=0.01,
                   help="warn when more of the vocabulary than this share cannot come from any text")  # fmt: skip
    c.add_argument("--strict-text", action="store_true", help="refuse the export rather than warn")


def _add_onnx(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = _parser(sub, "onnx", "export a PyTorch LSTM language model to a model folder, then verify it")
    _add_model_source(p)
    p.add_argument("--out", required=True, help="models folder; the model goes to OUT/NAME/VERSION")
    p.add_argument("--name", required=True, help="model name clients ask for")
    t = p.add_argument_group("tokenizer", "the tokenizer the model was trained with, recorded in its card")
    t.add_argument("--tokenizer", choices=KINDS,
                   help="(default: the --run's tokenizer, else words) words: lstmd's word tokenizer over --vocab; "
                   "whitespace: already-tokenized text over --vocab; "
                   "characters: one token per character over --vocab; hf: a tokenizers tokenizer.json; "
                   "sentencepiece: a SentencePiece .model")  # fmt: skip
    t.add_argument("--tokenizer-file", help="the hf kind's tokenizer.json or the sentencepiece kind's .model")
    t.add_argument("--lowercase", action="store_true", help="fold text to lower case before tokenizing")
    t.add_argument("--unk-token", help="the unknown token's name (default: the kind's, e.g. <unk>)")
    t.add_argument("--eos-token", help="the end of line / sentence token's name (default: the kind's, e.g. <eos>)")
    t.add_argument("--bos-token", help="the beginning of sequence token's name")
    t.add_argument("--newline-token", help="the token a newline becomes; '' for none (default: the eos token for "
                   "vocabulary kinds, the library's own handling for hf and sentencepiece)")  # fmt: skip
    t.add_argument("--initial", choices=INITIAL, help="a new session starts after this token, or from the zero "
                   "state with no token before its first (zeros: as pytorch/examples' word_language_model trains "
                   "and evaluates) (default: eos; bos for hf and sentencepiece when they have one)")  # fmt: skip
    p.add_argument("--version", default="1")
    p.add_argument("--force", action="store_true", help="replace OUT/NAME/VERSION if it exists")
    p.add_argument("--run", help="the folder lstmd-export train wrote: training facts and perplexities for the card")
    p.add_argument("--corpus", default=DEFAULT_CORPUS, help="the corpus --run was trained on (for --quantize)")
    p.add_argument(
        "--quantize",
        action="store_true",
        help="also write int8 dynamic quantization as "
        "OUT/NAME-int8/VERSION and measure its perplexity (needs --run) and speed",
    )


def _add_verify(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = _parser(sub, "verify", "check a model folder against its PyTorch model, and as lstmd-server loads it")
    _add_model_source(p)
    p.add_argument("model_dir", help="the model folder (holding model.onnx)")


def _real_ids(text: str | None, tokenizer: Tokenizer) -> list[int]:
    from lstmd.export.corpus import load_corpus

    docs = load_corpus(text or DEFAULT_CORPUS)
    return tokenizer.encode_text(docs[-1].text)[:256]


def _read_sample(source: str) -> str:
    """The sample text as written: a file's lines (gzipped or not, in any encoding corpus loading
    reads), or a folder's documents one after another."""
    from lstmd.export.corpus import load_corpus, read_text

    path = Path(source)
    if path.is_file():
        return read_text(path)
    return "".join(doc.text for doc in load_corpus(path))


def _run_text_check(args: argparse.Namespace, tokenizer: Tokenizer) -> dict[str, object]:
    """The text check (lstmd.export.text_check): print its warnings, or refuse with --strict-text.
    Returns the figures for the card."""
    from lstmd.export.text_check import TextCheckError, Thresholds, check_text, read_ids

    if args.text_ids and not args.text:
        raise TextCheckError("--text-ids needs --text: the text those ids were made from")
    if args.text_ids and not Path(args.text).is_file():
        raise TextCheckError("--text-ids needs --text to be one file, line by line as the ids")
    text = _read_sample(args.text) if args.text else None
    ids = read_ids(Path(args.text_ids).read_text(), Path(args.text_ids).name) if args.text_ids else None
    check = check_text(tokenizer, text, Path(args.text).name if args.text else "", ids,
                       Path(args.text_ids).name if args.text_ids else "")  # fmt: skip
    limits = Thresholds(args.max_unknown, args.max_unreachable)
    warnings = check.warnings(limits)
    if warnings and args.strict_text:
        raise TextCheckError("refused (--strict-text): " + "; ".join(warnings))
    for warning in warnings:
        print(f"WARNING: {warning}", file=sys.stderr)
    figures = f"{check.unreachable} of {check.vocabulary} vocabulary entries unreachable from text"
    if check.sample:
        figures = f"{check.unknown} of {check.tokens} tokens of {check.sample} unknown, " + figures
    if check.ids:
        figures += f", {check.ids.reproduced} of {check.ids.lines} lines of {check.ids.source} reproduced"
    print(f"text check: {figures}")
    return check.to_dict(limits)


def _tokenizer_source(args: argparse.Namespace) -> tuple[TokenizerSpec, Vocab | Path]:
    """The card's tokenizer section and the vocabulary or file it reads: from the flags, or with
    none of --tokenizer, --vocab and --tokenizer-file, the one the --run trained with."""
    if args.run and not (args.tokenizer or args.vocab or args.tokenizer_file):
        from lstmd.export.run_tokenizer import tokenizer_from_run

        return tokenizer_from_run(Path(args.run))
    kind = args.tokenizer or "words"
    spec = TokenizerSpec(kind, "", args.lowercase, args.unk_token, args.eos_token, args.bos_token,
                         args.newline_token, args.initial)  # fmt: skip
    if kind in ("hf", "sentencepiece"):
        if not args.tokenizer_file:
            raise SystemExit(f"lstmd-export onnx: --tokenizer {kind} needs --tokenizer-file")
        return spec, Path(args.tokenizer_file)
    if not args.vocab:
        raise SystemExit(f"lstmd-export onnx: --tokenizer {kind} needs --vocab")
    return spec, Vocab.load(args.vocab) if kind == "words" else Path(args.vocab)


def _load_model(args: argparse.Namespace) -> torch.nn.Module:
    from lstmd.export.adapters import adapt
    from lstmd.export.onnx_export import load_torch_model

    lm = load_torch_model(args.checkpoint, args.model_class, json.loads(args.model_kwargs))
    return adapt(lm, args.adapter, json.loads(args.adapter_kwargs)) if args.adapter else lm


def _run_verify(args: argparse.Namespace) -> tuple[dict[str, float], dict[str, object]]:
    """Parity on random and real input, then the text check; returns the figures of each."""
    from lstmd.export.verify import verify
    from lstmd.model.folder import read_model_dir

    _, tokenizer = read_model_dir(args.model_dir)  # the folder's own tokenizer gives the real input
    lm = _load_model(args)
    report = verify(lm, Path(args.model_dir), len(tokenizer), _real_ids(args.text, tokenizer), args.tolerance)
    print("verified: " + ", ".join(f"{k} {v:.1e}" for k, v in report.items()))
    return report, _run_text_check(args, tokenizer)


def _run_verify_command(args: argparse.Namespace) -> None:
    """``lstmd-export verify``: parity, the text check, then the checks lstmd-server runs when it loads the
    folder."""
    from lstmd.export.publish import check_servable

    _run_verify(args)
    folder = Path(args.model_dir)
    check_servable(folder, folder.resolve().parent.name)
    print(f"{folder}: lstmd-server loads it")


def _run_onnx(args: argparse.Namespace) -> None:
    """Export, verify and check as the server will in folders beside OUT/NAME/VERSION (and the int8
    one), which take their places only when every check has passed (lstmd.export.publish)."""
    from lstmd.export.onnx_export import read_report, write_model_dir
    from lstmd.export.publish import check_servable, staged
    from lstmd.model.folder import write_card

    if args.quantize and not args.run:
        raise SystemExit("lstmd-export onnx: --quantize needs --run to measure perplexity on the test split")
    spec, vocab = _tokenizer_source(args)
    lm = _load_model(args)
    training, ppl = read_report(Path(args.run) / "report.json") if args.run else ({}, {})
    folder = Path(args.out) / args.name / args.version
    int8_name = f"{args.name}-int8"
    with contextlib.ExitStack() as stack:
        work = stack.enter_context(staged(folder, args.force))
        int8 = (
            stack.enter_context(staged(Path(args.out) / int8_name / args.version, args.force))
            if args.quantize
            else None
        )
        card = write_model_dir(lm, vocab, work, args.name, args.version, training, ppl, spec)
        args.model_dir = str(work)
        parity, text_check = _run_verify(args)
        card.verification = {"max_abs_difference": parity, "tolerance": args.tolerance, "text_check": text_check}
        if int8:
            from lstmd.export.quantize import quantize_model_dir
            from lstmd.export.train import split_ids_from_run

            test_ids = split_ids_from_run(args.corpus, Path(args.run))[0]["test"]
            card.quantization = quantize_model_dir(work, int8, test_ids)
            check_servable(int8, int8_name)
        write_card(work, card)
        check_servable(work, args.name)
    print(f"wrote {folder} ({(folder / 'model.onnx').stat().st_size / 1e6:.1f} MB), checked as lstmd-server loads it")


def _add_reexport(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = _parser(sub, "reexport", "re-export a model folder of lstmd's own model from the weights in its "
                "model.onnx, with this version's serving graph; verified, then it replaces the old graph")  # fmt: skip
    p.add_argument("model_dir", help="the model folder (holding model.onnx), e.g. server/models/pd-english/1")
    p.add_argument("--text", help="sample text for the real-input parity check (default: lstmd's English sample)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed absolute difference")


def _run_reexport(args: argparse.Namespace) -> None:
    from lstmd.export.reexport import reexport_model_dir
    from lstmd.model.folder import read_model_dir

    folder = Path(args.model_dir)
    _, tokenizer = read_model_dir(folder)
    report = reexport_model_dir(folder, _real_ids(args.text, tokenizer), args.tolerance)
    print("verified: " + ", ".join(f"{k} {v:.1e}" for k, v in report.items()))
    size = (folder / "model.onnx").stat().st_size / 1e6
    print(f"re-exported {folder} ({size:.1f} MB), checked as lstmd-server loads it")


def _add_baseline(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = _parser(
        sub,
        "baseline",
        "Kneser-Ney n-gram perplexity on a training run's split and tokenizer (added to its report.json)",
    )
    p.add_argument("--corpus", default=DEFAULT_CORPUS, help="the corpus the run was split from (unused after --split)")
    p.add_argument("--run", required=True, help="the folder lstmd-export train wrote")
    p.add_argument("--order", type=int, default=3)


def _run_baseline(args: argparse.Namespace) -> None:
    from lstmd.export.train import kneser_ney_baseline, split_from_run

    run = Path(args.run)
    split = split_from_run(args.corpus, run)
    baseline = kneser_ney_baseline(split.ids, split.vocab_size, args.order, split.initial_id, split.text)
    print(json.dumps(baseline))
    report_path = run / "report.json"
    if report_path.exists():
        report = json.loads(report_path.read_text())
        report["baseline"] = baseline
        report_path.write_text(json.dumps(report, indent=1))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lstmd-export", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_onnx(sub)
    _add_verify(sub)
    _add_reexport(sub)
    _add_baseline(sub)
    args = parser.parse_args(argv)
    try:
        commands = {"train": _run_train, "onnx": _run_onnx, "verify": _run_verify_command,
                    "reexport": _run_reexport, "baseline": _run_baseline}  # fmt: skip
        commands[args.command](args)
    except ModuleNotFoundError as e:
        return missing_extra(e, f"lstmd-export {args.command}", "export")
    except ExportError as e:
        print(f"lstmd-export {args.command}: {e}", file=sys.stderr)
        return 1
    return 0
