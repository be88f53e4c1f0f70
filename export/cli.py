"""``lstmd-export``: train, export to ONNX, verify, and build the n-gram baseline."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

DEFAULT_CORPUS = "export/data/pd-english"


def _add_train(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "train", help="train a word-level LSTM language model", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--corpus", default=DEFAULT_CORPUS, help="text file or folder of .txt/.txt.gz files")
    p.add_argument("--out", required=True, help="work folder: vocab, split, checkpoints, report")
    p.add_argument("--vocab-size", type=int, default=10000)
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
    p.add_argument("--max-minutes", type=float, default=0.0, help="time budget (0: none)")
    p.add_argument("--max-train-tokens", type=int, default=0, help="use only this many tokens (smoke runs)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")


def _run_train(args: argparse.Namespace) -> None:
    from export.train import TrainConfig, train

    cfg = TrainConfig(
        corpus=args.corpus,
        out_dir=args.out,
        vocab_size=args.vocab_size,
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
    print(json.dumps({k: report[k] for k in ("valid_ppl", "test_ppl", "training_minutes")}))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lstmd-export", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    args = parser.parse_args(argv)
    {"train": _run_train}[args.command](args)
    return 0
