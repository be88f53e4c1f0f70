"""Training: truncated BPTT over a corpus split by document (or split as given), with early stopping.

The classic recipe (pytorch/examples ``word_language_model``): the token stream of each
split is cut into ``batch_size`` parallel streams; each step trains on ``bptt`` tokens of
every stream and carries (h, c) into the next step, detached from the graph.

Evaluation scores every token of a split once (the first after the token sessions start
after), so its total negative log-likelihood (NLL) can be divided by what any tokenization
shares: the split's words (counted by whitespace in the text as loaded) for perplexity per
word, and its characters for bits per character. Per-token perplexity compares only models
of the same tokenizer.
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

from lstmd.export.corpus import SPLITS, Document, cut_blocks, load_corpus, read_split_file, split_documents
from lstmd.export.errors import ExportError
from lstmd.export.model import LSTMLanguageModel, ModelConfig
from lstmd.export.ngram import KneserNey
from lstmd.export.run_tokenizer import TokenizerChoice, fit_tokenizer, open_run_tokenizer
from lstmd.model.tokenizer import Tokenizer

IGNORE = -100  # a padding target, which cross_entropy skips


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
    tokenizer: str = "words"  # the TokenizerChoice fields (lstmd.export.run_tokenizer)
    keep_case: bool = False
    lowercase: bool = False
    vocab_file: str = ""
    min_count: int = 0  # > 0: every token seen this often, instead of the vocab_size most frequent
    subword_vocab_size: int = 8000
    split_files: list[str] = field(default_factory=list)  # train, valid, test files used as is; []: split corpus

    @property
    def tokenizer_choice(self) -> TokenizerChoice:
        return TokenizerChoice(self.tokenizer, self.keep_case, self.lowercase, self.vocab_file, self.vocab_size,
                               self.min_count, self.subword_vocab_size)  # fmt: skip


def batchify(ids: list[int], batch_size: int) -> torch.Tensor:
    """(batch, steps): ``batch_size`` contiguous streams; the tail that does not fit is dropped."""
    steps = len(ids) // batch_size
    if steps < 2:
        raise ValueError(f"{len(ids)} tokens are too few for batch size {batch_size}")
    return torch.tensor(ids[: steps * batch_size], dtype=torch.long).view(batch_size, steps)


def split_ids(docs: list[Document], tokenizer: Tokenizer) -> list[int]:
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer.encode_text(doc.text))
    return ids


@dataclass
class RunSplit:
    """A training run's splits as token ids, and what its measures divide by."""

    ids: dict[str, list[int]]
    vocab_size: int
    initial_id: int | None  # the token sessions start after: the context of each split's first token; None: zeros
    text: dict[str, dict[str, int]]  # {split: {"words": ..., "characters": ...}} of the text as loaded


def split_docs(cfg_split_files: list[str], corpus: str, block_words: int) -> dict[str, list[Document]]:
    """The documents of each split: the three files as given, or the corpus split by document."""
    if cfg_split_files:
        if len(cfg_split_files) != len(SPLITS):
            raise ExportError(f"--split takes {len(SPLITS)} files (train, valid, test)")
        return {s: [read_split_file(f)] for s, f in zip(SPLITS, cfg_split_files, strict=True)}
    return split_documents(cut_blocks(load_corpus(corpus), block_words))


def text_counts(docs: list[Document]) -> dict[str, int]:
    return {"words": sum(len(d.text.split()) for d in docs), "characters": sum(len(d.text) for d in docs)}


def split_from_run(corpus: str, run: Path) -> RunSplit:
    """The splits of an earlier training run, tokenized as it was (from its split.json and its
    tokenizer's file); ``corpus`` is not read when the run was given its split as files."""
    record = json.loads((run / "split.json").read_text())
    tokenizer = open_run_tokenizer(run)
    if "files" in record:
        splits = split_docs(record["files"], corpus, 0)
    else:
        docs = {d.name: d for d in cut_blocks(load_corpus(corpus), record.get("block_words", 20000))}
        splits = {s: [docs[name] for name in record[s]] for s in SPLITS}
    return RunSplit(
        ids={s: split_ids(ds, tokenizer) for s, ds in splits.items()},
        vocab_size=len(tokenizer),
        initial_id=tokenizer.initial_id,
        text={s: text_counts(ds) for s, ds in splits.items()},
    )


def split_ids_from_run(corpus: str, run: Path) -> tuple[dict[str, list[int]], int]:
    """The token ids of each split of an earlier training run, and the vocabulary size."""
    split = split_from_run(corpus, run)
    return split.ids, split.vocab_size


def eval_batches(ids: list[int], initial_id: int | None, streams: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), each (streams, steps), in which every id of ``ids`` is a target exactly
    once: ``initial_id`` gives the first its context, each stream starts with the last token of the
    one before, and the end of the last streams is padded (inputs 0, targets ``IGNORE``). With
    ``initial_id`` None (a model that starts from zeros) the first id has no context and is no
    target: ``scored_tokens`` counts the targets."""
    seq = ids if initial_id is None else [initial_id, *ids]
    steps = max(1, math.ceil((len(seq) - 1) / streams))
    inputs = torch.zeros(streams, steps, dtype=torch.long)
    targets = torch.full((streams, steps), IGNORE, dtype=torch.long)
    for k in range(streams):
        chunk = torch.tensor(seq[k * steps : k * steps + steps + 1], dtype=torch.long)
        if len(chunk) < 2:
            break
        inputs[k, : len(chunk) - 1] = chunk[:-1]
        targets[k, : len(chunk) - 1] = chunk[1:]
    return inputs, targets


def scored_tokens(ids: list[int], initial_id: int | None) -> int:
    """How many of ``ids`` are targets of ``eval_batches``: all, or all but the first from zeros."""
    return len(ids) if initial_id is not None else max(0, len(ids) - 1)


@torch.no_grad()
def evaluate(model: LSTMLanguageModel, data: tuple[torch.Tensor, torch.Tensor], bptt: int) -> float:
    """Total NLL (nats) of the targets of ``eval_batches``, carrying state across windows."""
    model.eval()
    inputs, targets = data  # (batch, steps) each
    state = model.init_state(inputs.size(0))
    total = 0.0
    for i in range(0, inputs.size(1), bptt):
        logits, state = model(inputs[:, i : i + bptt], state)
        total += nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), targets[:, i : i + bptt].reshape(-1), reduction="sum",
            ignore_index=IGNORE,
        ).item()  # fmt: skip
    return total


def measures(nll: float, tokens: int, text: dict[str, int] | None) -> dict[str, float]:
    """Perplexity per token, and, when the split's text was scored whole (``text`` given), per
    word (exp(NLL / words)) and bits per character (NLL / ln 2 / characters)."""
    out: dict[str, float] = {"nll": nll, "tokens": tokens, "ppl": math.exp(nll / tokens)}
    if text:
        out |= {"words": text["words"], "word_ppl": math.exp(nll / text["words"])}
        out |= {"characters": text["characters"], "bpc": nll / math.log(2) / text["characters"]}
    return out


def kneser_ney_baseline(
    ids: dict[str, list[int]],
    vocab_size: int,
    order: int,
    initial_id: int | None = None,
    text: dict[str, dict[str, int]] | None = None,
) -> dict[str, object]:
    """Interpolated Kneser-Ney perplexities on the same split and tokenizer as the LSTM, scoring
    the same tokens (each split's first after ``initial_id``) so the measures compare."""
    started = time.monotonic()
    kn = KneserNey(order=order).fit(ids["train"], vocab_size)
    scored = {s: ids[s] if initial_id is None else [initial_id, *ids[s]] for s in ("valid", "test")}
    ppl = {s: kn.perplexity(v) for s, v in scored.items()}
    result: dict[str, object] = {"kind": "interpolated Kneser-Ney", "order": order}
    for s, v in scored.items():
        result[f"{s}_ppl"] = ppl[s]
        result[s] = measures(math.log(ppl[s]) * (len(v) - 1), len(v) - 1, text[s] if text else None)
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


def summary(name: str, m: dict[str, float]) -> str:
    """``m`` (of ``measures``) in a line: what compares across tokenizers comes with it."""
    line = f"{name} ppl {m['ppl']:.1f} per token"
    if "word_ppl" in m:
        line += f", {m['word_ppl']:.1f} per word, {m['bpc']:.3f} bits per character"
    return line


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
    """Train and write ``out_dir``: the tokenizer's file (vocab.txt or tokenizer.json), split.json
    (with the tokenizer's spec), checkpoint.pt, best.pt, report.json."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    splits = split_docs(cfg.split_files, cfg.corpus, cfg.block_words)
    tokenizer = fit_tokenizer(out, cfg.tokenizer_choice, [d.text for d in splits["train"]])
    split_record: dict[str, object] = {"block_words": cfg.block_words, "tokenizer": tokenizer.spec.to_dict()}
    if cfg.split_files:
        split_record["files"] = [str(Path(f).resolve()) for f in cfg.split_files]
    split_record |= {s: [d.name for d in ds] for s, ds in splits.items()}
    (out / "split.json").write_text(json.dumps(split_record, indent=1))
    ids = {s: split_ids(ds, tokenizer) for s, ds in splits.items()}
    counts: dict[str, dict[str, int]] | None = {s: text_counts(ds) for s, ds in splits.items()}
    if cfg.max_train_tokens:
        cut = {s: v[: cfg.max_train_tokens] for s, v in ids.items()}
        counts = counts if cut == ids else None  # words and characters of a cut split are unknown
        ids = cut
    train_data = batchify(ids["train"], cfg.batch_size)
    valid_data = eval_batches(ids["valid"], tokenizer.initial_id, 10)
    test_data = eval_batches(ids["test"], tokenizer.initial_id, 10)

    model = LSTMLanguageModel(ModelConfig(vocab_size=len(tokenizer), **cfg.model))  # type: ignore[arg-type]
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
        f"{len(tokenizer)} tokens ({tokenizer.spec.kind}), {params / 1e6:.2f}M parameters, train/valid/test tokens "
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
        valid_ppl = math.exp(evaluate(model, valid_data, cfg.bptt) / scored_tokens(ids["valid"], tokenizer.initial_id))
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
    scored = {
        s: measures(
            evaluate(model, data, cfg.bptt), scored_tokens(ids[s], tokenizer.initial_id), counts[s] if counts else None
        )
        for s, data in (("valid", valid_data), ("test", test_data))
    }
    baseline = kneser_ney_baseline(ids, len(tokenizer), cfg.baseline_order, tokenizer.initial_id, counts)
    report = {
        "model": best["config"],
        "tokenizer": tokenizer.spec.to_dict(),
        "parameters": params,
        "train": {k: v for k, v in cfg.__dict__.items() if k not in ("corpus", "out_dir")},
        "corpus": Path(cfg.corpus).name,
        "split": {s: len(ds) for s, ds in splits.items()},
        "split_documents": {s: [d.name for d in ds] for s, ds in splits.items()},
        "tokens": {s: len(v) for s, v in ids.items()},
        "history": history,
        "valid_ppl": scored["valid"]["ppl"],
        "test_ppl": scored["test"]["ppl"],
        **scored,  # "valid", "test": the measures, per token, per word and per character
        "training_minutes": round(elapsed / 60, 1),
        "stopped_mid_epoch": stopped_mid_epoch,  # null, or the epoch the time budget cut short and its batches
        "machine": _machine(),
        "baseline": baseline,
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print(f"best model: {summary('valid', scored['valid'])}; {summary('test', scored['test'])}")
    print(f"Kneser-Ney order {cfg.baseline_order}: {summary('test', baseline['test'])}")  # type: ignore[arg-type]
    return report
