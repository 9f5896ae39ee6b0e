"""The dataset summary printed before training: what is there, what was dropped and why."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

HISTOGRAM_BINS = 8
BAR_WIDTH = 40


@dataclass
class DataSummary:
    """Counts after tokenization and the length policy.

    ``records`` is how many records were read; ``samples`` how many training samples are left (for pretraining:
    blocks). ``loss_tokens`` counts tokens that receive loss after the usual shift by one. Every record that is
    not a sample is counted in ``dropped_too_long`` or ``no_loss_samples``; ``examples`` holds up to five
    ``path:line`` locations for each reason.
    """

    kind: str
    data_path: str
    records: int
    samples: int
    tokens: int
    loss_tokens: int
    max_seq_len: int
    dropped_too_long: int = 0
    truncated: int = 0
    no_loss_samples: int = 0
    block_size: int | None = None
    longest_record: int = 0
    length_min: int = 0
    length_mean: float = 0.0
    length_max: int = 0
    histogram: list = field(default_factory=list)  # [[low, high, count], ...], inclusive token-length bins
    examples: dict = field(default_factory=dict)  # reason -> ["path:line", ...]

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        """Human-readable text with a length histogram."""
        lines = [f"Data summary ({self.kind}, {self.data_path})",
                 f"  records read              {self.records:>10,}",
                 f"  samples kept              {self.samples:>10,}" + (
                     f"  (blocks of {self.block_size} tokens)" if self.block_size else ""),
                 f"  tokens                    {self.tokens:>10,}",
                 f"  loss-bearing tokens       {self.loss_tokens:>10,}  ({_percent(self.loss_tokens, self.tokens)})"]
        for label, count, reason in (
                (f"dropped: > max_seq_len={self.max_seq_len}", self.dropped_too_long, "too_long"),
                (f"truncated to max_seq_len={self.max_seq_len}", self.truncated, "truncated"),
                ("dropped: no loss-bearing tokens", self.no_loss_samples, "no_loss")):
            example = self.examples.get(reason)
            tail = f"  e.g. {', '.join(example)}" if count and example else ""
            lines.append(f"  {label:<40}{count:>6,}{tail}")
        if self.longest_record > self.max_seq_len:
            lines.append(f"  longest record: {self.longest_record:,} tokens")
        if self.samples:
            lines.append(f"  sample length: min {self.length_min:,}, mean {self.length_mean:,.1f}, "
                         f"max {self.length_max:,} tokens")
            lines.extend(format_histogram(self.histogram))
        return "\n".join(lines)


def _percent(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "n/a"


def _nice_width(span: int, bins: int) -> int:
    """The smallest 1, 2 or 5 times a power of ten that covers ``span`` in ``bins`` bins."""
    width = 1
    while width * bins < span:
        for factor in (2, 2.5, 2):  # 1 -> 2 -> 5 -> 10 -> 20 ...
            width = int(width * factor)
            if width * bins >= span:
                break
    return width


def length_histogram(lengths, max_seq_len: int, bins: int = HISTOGRAM_BINS) -> list[list[int]]:
    """``[[low, high, count], ...]`` for ``lengths`` (a numpy array) in bins of a round width, inclusive bounds,
    from 1 up to the bin holding the longest sample."""
    import numpy as np

    longest = int(lengths.max()) if len(lengths) else max_seq_len
    width = _nice_width(longest + 1, bins)
    counts = np.bincount(np.asarray(lengths, dtype=np.int64) // width, minlength=longest // width + 1)
    return [[max(1, i * width), (i + 1) * width - 1, int(c)] for i, c in enumerate(counts) if (i + 1) * width > 1]


def format_histogram(histogram: list) -> list[str]:
    peak = max((count for _, _, count in histogram), default=0) or 1
    lines = ["  length histogram (tokens per sample):"]
    for low, high, count in histogram:
        bar = "#" * round(BAR_WIDTH * count / peak)
        if count and not bar:
            bar = "."
        lines.append(f"    {low:>7,} - {high:>7,} | {bar:<{BAR_WIDTH}} {count:,}")
    return lines
