"""Training: truncated BPTT over a corpus split by document, with early stopping.

The classic recipe (pytorch/examples ``word_language_model``): the token stream of each
split is cut into ``batch_size`` parallel streams; each step trains on ``bptt`` tokens of
every stream and carries (h, c) into the next step, detached from the graph.
"""

from __future__ import annotations

import json
import math
import platform
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from lstmd.export.corpus import SPLITS, Document, cut_blocks, load_corpus, split_documents
from lstmd.export.model import LSTMLanguageModel, ModelConfig
from lstmd.export.ngram import KneserNey
from lstmd.model.tokenizer import Vocab


@dataclass
class TrainConfig:
    corpus: str
    out_dir: str
    vocab_size: int = 10000
    block_words: int = 20000
    batch_size: int = 64
    bptt: int = 35
    lr: float = 2e-3
    clip: float = 0.25
    max_epochs: int = 40
    patience: int = 2  # epochs without validation improvement before stopping
    max_minutes: float = 0.0  # 0 = no time budget; otherwise stop at the first batch that passes it
    max_train_tokens: int = 0  # 0 = all; for quick smoke runs
    seed: int = 1
    baseline_order: int = 3  # Kneser-Ney n-gram baseline fitted on the same split and vocabulary
    threads: int = 0  # 0 = torch's default
    model: dict[str, object] = field(default_factory=dict)  # ModelConfig fields


def batchify(ids: list[int], batch_size: int) -> torch.Tensor:
    """(batch, steps): ``batch_size`` contiguous streams; the tail that does not fit is dropped."""
    steps = len(ids) // batch_size
    if steps < 2:
        raise ValueError(f"{len(ids)} tokens are too few for batch size {batch_size}")
    return torch.tensor(ids[: steps * batch_size], dtype=torch.long).view(batch_size, steps)


def split_ids(docs: list[Document], vocab: Vocab) -> list[int]:
    ids: list[int] = []
    for doc in docs:
        ids.extend(vocab.encode(doc.words))
    return ids


def split_ids_from_run(corpus: str, run: Path) -> tuple[dict[str, list[int]], int]:
    """The token ids of each split of an earlier training run (from its split.json and vocab.txt)."""
    record = json.loads((run / "split.json").read_text())
    vocab = Vocab.load(run / "vocab.txt")
    docs = {d.name: d for d in cut_blocks(load_corpus(corpus), record.get("block_words", 20000))}
    return {s: split_ids([docs[name] for name in record[s]], vocab) for s in SPLITS}, len(vocab)


@torch.no_grad()
def evaluate(model: LSTMLanguageModel, data: torch.Tensor, bptt: int) -> float:
    """Perplexity of ``data`` (batch, steps), carrying state across windows."""
    model.eval()
    state = model.init_state(data.size(0))
    total_loss, total_tokens = 0.0, 0
    for i in range(0, data.size(1) - 1, bptt):
        x = data[:, i : i + bptt]
        y = data[:, i + 1 : i + 1 + bptt]
        x = x[:, : y.size(1)]
        logits, state = model(x, state)
        total_loss += nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum"
        ).item()
        total_tokens += y.numel()
    return math.exp(total_loss / total_tokens)


def kneser_ney_baseline(ids: dict[str, list[int]], vocab_size: int, order: int) -> dict[str, object]:
    """Interpolated Kneser-Ney perplexities on the same split and vocabulary as the LSTM."""
    started = time.monotonic()
    kn = KneserNey(order=order).fit(ids["train"], vocab_size)
    return {
        "kind": "interpolated Kneser-Ney",
        "order": order,
        "valid_ppl": kn.perplexity(ids["valid"]),
        "test_ppl": kn.perplexity(ids["test"]),
        "seconds": round(time.monotonic() - started, 1),
    }


PROGRESS_LINE_S = 300.0  # off a terminal, a progress line at least this often (and at each tenth)


class _Progress:
    """An epoch's progress on stderr: tqdm's bar on a terminal; anywhere else (CI, a log file)
    a plain line at each tenth of the epoch and at least every ``PROGRESS_LINE_S`` seconds, so
    that a log gets a few lines rather than every redraw of a bar."""

    def __init__(self, epoch: int, batches: int) -> None:
        self.epoch, self.batches = epoch, batches
        self.started = self.last_line = time.monotonic()
        self.tenths = 0  # tenths of the epoch already reported
        self.bar: tqdm[None] | None = None
        if sys.stderr.isatty():
            self.bar = tqdm(total=batches, desc=f"epoch {epoch}", unit="batch", dynamic_ncols=True, mininterval=1.0)

    def update(self, batch: int, loss: float, tokens: int) -> None:
        """After ``batch`` batches (counted from 1) whose mean loss over ``tokens`` tokens is ``loss``."""
        now = time.monotonic()
        rate = tokens / max(now - self.started, 1e-9)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", ppl=f"{math.exp(loss):.0f}", tok_s=f"{rate:.0f}", refresh=False)
            self.bar.update(1)
            return
        tenths = batch * 10 // self.batches
        if tenths > self.tenths or now - self.last_line >= PROGRESS_LINE_S:
            self.tenths, self.last_line = tenths, now
            print(
                f"epoch {self.epoch}: batch {batch}/{self.batches} ({batch / self.batches:.0%}), "
                f"loss {loss:.3f}, ppl {math.exp(loss):.0f}, {rate:.0f} tokens/s",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _machine() -> str:
    return f"{platform.machine()}, {torch.get_num_threads()} threads, {platform.processor() or platform.system()}"


def train(cfg: TrainConfig, resume: bool = False) -> dict[str, object]:
    """Train and write ``out_dir``: vocab.txt, split.json, checkpoint.pt, best.pt, report.json."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    docs = cut_blocks(load_corpus(cfg.corpus), cfg.block_words)
    splits = split_documents(docs)
    vocab = Vocab.build((w for d in splits["train"] for w in d.words), cfg.vocab_size)
    vocab.save(out / "vocab.txt")
    split_record = {"block_words": cfg.block_words, **{s: [d.name for d in ds] for s, ds in splits.items()}}
    (out / "split.json").write_text(json.dumps(split_record, indent=1))
    ids = {s: split_ids(ds, vocab) for s, ds in splits.items()}
    if cfg.max_train_tokens:
        ids = {s: v[: cfg.max_train_tokens] for s, v in ids.items()}
    train_data = batchify(ids["train"], cfg.batch_size)
    valid_data = batchify(ids["valid"], 10)
    test_data = batchify(ids["test"], 10)

    model = LSTMLanguageModel(ModelConfig(vocab_size=len(vocab), **cfg.model))  # type: ignore[arg-type]
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.25, patience=0)
    history: list[dict[str, float]] = []
    best_ppl, epoch, elapsed = math.inf, 0, 0.0
    ckpt_path = out / "checkpoint.pt"
    if resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng"])
        history, best_ppl, epoch, elapsed = ckpt["history"], ckpt["best_ppl"], ckpt["epoch"], ckpt["elapsed"]
        print(f"resumed after epoch {epoch} (best validation perplexity {best_ppl:.1f})")

    params = sum(p.numel() for p in model.parameters())
    print(
        f"{len(vocab)} words, {params / 1e6:.2f}M parameters, train/valid/test tokens "
        f"{len(ids['train'])}/{len(ids['valid'])}/{len(ids['test'])}"
    )
    stale = 0  # epochs since the best one
    if history:
        best_epoch = min(range(len(history)), key=lambda i: history[i]["valid_ppl"])
        stale = len(history) - 1 - best_epoch
    loss_fn = nn.CrossEntropyLoss()
    budget_s = cfg.max_minutes * 60 if cfg.max_minutes else math.inf
    stopped_mid_epoch: dict[str, int] | None = None  # where the time budget cut an epoch short
    while epoch < cfg.max_epochs and stale < cfg.patience:
        if elapsed >= budget_s:
            print(f"time budget of {cfg.max_minutes} minutes reached")
            break
        epoch += 1
        model.train()
        state = model.init_state(cfg.batch_size)
        started = time.monotonic()
        steps = range(0, train_data.size(1) - 1, cfg.bptt)
        progress = _Progress(epoch, len(steps))
        run_loss, run_tokens = 0.0, 0
        for batch, i in enumerate(steps, 1):
            x = train_data[:, i : i + cfg.bptt]
            y = train_data[:, i + 1 : i + 1 + cfg.bptt]
            x = x[:, : y.size(1)]
            state = (state[0].detach(), state[1].detach())  # truncated BPTT
            logits, state = model(x, state)
            loss = loss_fn(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            optimizer.step()
            run_loss += loss.item() * y.numel()
            run_tokens += y.numel()
            progress.update(batch, run_loss / run_tokens, run_tokens)
            if batch < len(steps) and elapsed + time.monotonic() - started >= budget_s:
                stopped_mid_epoch = {"epoch": epoch, "batches": batch, "of": len(steps)}
                break
        progress.close()
        if stopped_mid_epoch:
            print(
                f"time budget of {cfg.max_minutes} minutes reached in epoch {epoch} after {batch}/{len(steps)} batches"
            )
        # A cut epoch is validated too: its weights may still be the best so far.
        valid_ppl = evaluate(model, valid_data, cfg.bptt)
        elapsed += time.monotonic() - started
        scheduler.step(valid_ppl)
        history.append(
            {
                "epoch": epoch,
                "train_ppl": math.exp(run_loss / run_tokens),
                "valid_ppl": valid_ppl,
                "lr": optimizer.param_groups[0]["lr"],
                "minutes": elapsed / 60,
                **({"batches": batch, "of": len(steps)} if stopped_mid_epoch else {}),
            }
        )
        print(
            f"epoch {epoch}: train ppl {history[-1]['train_ppl']:.1f}, valid ppl {valid_ppl:.1f}, "
            f"{elapsed / 60:.1f} min"
        )
        if valid_ppl < best_ppl:
            best_ppl, stale = valid_ppl, 0
            torch.save({"config": model.config.to_dict(), "model": model.state_dict()}, out / "best.pt")
        else:
            stale += 1
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state(),
                "history": history,
                "best_ppl": best_ppl,
                "epoch": epoch,
                "elapsed": elapsed,
            },
            ckpt_path,
        )
        if stopped_mid_epoch:
            break

    best = torch.load(out / "best.pt", weights_only=False)
    model.load_state_dict(best["model"])
    report = {
        "model": best["config"],
        "parameters": params,
        "train": {k: v for k, v in cfg.__dict__.items() if k not in ("corpus", "out_dir")},
        "corpus": Path(cfg.corpus).name,
        "split": {s: len(ds) for s, ds in splits.items()},
        "split_documents": {s: [d.name for d in ds] for s, ds in splits.items()},
        "tokens": {s: len(v) for s, v in ids.items()},
        "history": history,
        "valid_ppl": evaluate(model, valid_data, cfg.bptt),
        "test_ppl": evaluate(model, test_data, cfg.bptt),
        "training_minutes": round(elapsed / 60, 1),
        "stopped_mid_epoch": stopped_mid_epoch,  # null, or the epoch the time budget cut short and its batches
        "machine": _machine(),
        "baseline": kneser_ney_baseline(ids, len(vocab), cfg.baseline_order),
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    baseline = report["baseline"]
    print(
        f"best model: valid ppl {report['valid_ppl']:.1f}, test ppl {report['test_ppl']:.1f}; "
        f"Kneser-Ney order {cfg.baseline_order}: test ppl {baseline['test_ppl']:.1f}"
    )
    return report
