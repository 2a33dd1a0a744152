"""Task data: read files (or a `datasets` id), validate every record, split, build label maps.

Examples are plain dicts that remember where they came from (`line`), so any later problem
(an unknown label in the test file, say) can still name the file and line:

    classification: {"text": str, "label": str, "line": int}
    ner:            {"tokens": [str], "tags": [str], "line": int}
    qa:             {"id", "title", "question", "context", "answers": [{"text", "answer_start"}], "line"}
    dialogue:       {"messages": [{"role", "content"}, ...], "line"}   (ends with an assistant turn)

Formats (`DataConfig.format`, "auto" picks by extension):
    csv / tsv      header row; text and label columns by name (auto-detected from common names)
    json           a list of objects, or an object holding one such list (e.g. {"data": [...]})
    jsonl          one object per line
    conll          NER: one token per line, whitespace-separated columns, blank line between
                   sentences, `-DOCSTART-` lines skipped; token column 0, tag column last by default
    at             classification: `text@label` per line, split on the last `@`
                   (Financial PhraseBank; pass encoding latin-1 for it)
    hub            a `datasets` id, loaded with `datasets.load_dataset` (needs the Hub)
QA reads SQuAD JSON (`{"data": [{"title", "paragraphs": [{"context", "qas": [...]}]}]}`), or flat
CSV / TSV / JSONL / JSON records with question, context, answer text and answer start (or a
SQuAD-style `answers` object). Answer offsets are checked: an answer whose text is not at its offset
is moved to the occurrence of that text in the context nearest to the given offset (the example is
marked `fixed`, counted in data.json); an answer whose text is nowhere in the context is an error.
Dialogue reads JSON / JSONL records holding a `messages` (or `conversations`) list of
{role, content} turns, or prompt / response columns (instruction / response, ...) from CSV, TSV,
JSON or JSONL, which become one user turn and one assistant turn (after `system_prompt`, if set).
Roles are system, user and assistant; a conversation must end with an assistant turn.
QA splits are made by article (title), or by context when there are no titles, so no passage is in
two splits.
"""

from __future__ import annotations

import csv
import io
import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.config import DataConfig
from core.errors import DataError

TEXT_COLUMNS = ("text", "sentence", "sentence1", "content", "instruction", "review", "document", "utterance", "query", "question")
LABEL_COLUMNS = ("label", "labels", "intent", "category", "class", "sentiment", "target", "y")
QUESTION_COLUMNS = ("question", "query", "q")
CONTEXT_COLUMNS = ("context", "passage", "document", "paragraph")
ANSWER_COLUMNS = ("answer", "answer_text", "answers", "text")
ANSWER_START_COLUMNS = ("answer_start", "start", "answer_offset")
PROMPT_COLUMNS = ("instruction", "prompt", "question", "input", "query", "source")
RESPONSE_COLUMNS = ("response", "output", "answer", "completion", "target", "summary", "translation")
MESSAGE_KEYS = ("messages", "conversations", "conversation")
ROLES = ("system", "user", "assistant")
TOKEN_KEYS = ("tokens", "words")
TAG_KEYS = ("ner_tags", "tags", "labels", "label")
EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".conll": "conll"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
MAX_FILE_BYTES = 2 * 1024**3  # refuse to read more than this into memory


@dataclass
class TaskData:
    """Splits of one task, with the label list shared by all of them (index = class id)."""

    task: str
    labels: list[str]
    train: list[dict]
    validation: list[dict]
    test: list[dict] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)  # split -> where it came from

    def summary(self) -> dict[str, Any]:
        out = {
            "task": self.task,
            "labels": self.labels,
            "sizes": {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)},
            "sources": self.sources,
        }
        if self.task == "qa":
            out["answers_fixed"] = sum(ex.get("fixed", False) for s in (self.train, self.validation, self.test) for ex in s)
        return out


# ---- public API ---------------------------------------------------------------------------------
def load_task_data(cfg: DataConfig, seed: int = 42, labels: list[str] | None = None) -> TaskData:
    """Read, validate and split the data that `cfg` names.

    `labels` fixes the label list (e.g. when re-tuning a parent run); otherwise it is built from the
    training split. Labels in validation/test that training never saw are an error (file and line).
    """
    if not cfg.train:
        raise DataError("data.train", "no training data given")
    sources: dict[str, str] = {}
    hub_splits = None
    if _is_hub(cfg.train, cfg.format):
        hub_splits = load_hub_splits(cfg)
        train = hub_splits["train"]
    else:
        train = read_examples(cfg.train, cfg)
    sources["train"] = cfg.train

    rng = random.Random(seed)
    if cfg.validation:
        validation = read_examples(cfg.validation, cfg)
        sources["validation"] = cfg.validation
    elif hub_splits and "validation" in hub_splits:
        validation = hub_splits["validation"]
        sources["validation"] = f"{cfg.train} (validation split)"
    else:
        train, validation = split_examples(train, cfg.validation_fraction, cfg.task, rng, cfg.train)
        sources["validation"] = f"{cfg.validation_fraction:.0%} of {cfg.train} (seed {seed})"
    if cfg.test:
        test = read_examples(cfg.test, cfg)
        sources["test"] = cfg.test
    elif hub_splits and "test" in hub_splits:
        test = hub_splits["test"]
        sources["test"] = f"{cfg.train} (test split)"
    elif cfg.test_fraction > 0:
        frac = cfg.test_fraction / (1.0 - (0.0 if cfg.validation else cfg.validation_fraction))
        train, test = split_examples(train, frac, cfg.task, rng, cfg.train)
        sources["test"] = f"{cfg.test_fraction:.0%} of {cfg.train} (seed {seed})"
    else:
        test = []

    train = subsample(train, cfg.max_train_samples, rng)
    validation = subsample(validation, cfg.max_eval_samples, rng)
    test = subsample(test, cfg.max_eval_samples, rng)

    if labels is None:
        labels = build_labels(cfg.task, train, cfg.train)
    check_labels(cfg.task, train, labels, sources["train"])
    check_labels(cfg.task, validation, labels, cfg.validation or sources["validation"])
    check_labels(cfg.task, test, labels, cfg.test or sources.get("test", ""))
    if not validation:
        raise DataError(sources["validation"], "the validation split is empty; give more data or a validation file")
    return TaskData(cfg.task, labels, train, validation, test, sources)


def read_examples(path: str | Path, cfg: DataConfig) -> list[dict]:
    """Read one file of task examples, validating every record."""
    path = Path(path)
    fmt = detect_format(path, cfg)
    text = read_text(path, cfg.encoding)
    if cfg.task == "qa":
        examples = _read_qa(path, text, fmt, cfg)
    elif cfg.task == "dialogue":
        examples = _read_dialogue(path, text, fmt, cfg)
    elif cfg.task == "ner":
        if fmt == "conll":
            examples = _read_conll(path, text, cfg)
        elif fmt in ("json", "jsonl"):
            examples = [_ner_record(path, line, rec, cfg) for line, rec in _json_records(path, text, fmt)]
        else:
            raise DataError(path, f"format {fmt!r} is not supported for NER; use conll, json or jsonl")
    else:
        if fmt in ("csv", "tsv"):
            examples = _read_delimited(path, text, "," if fmt == "csv" else "\t", cfg)
        elif fmt in ("json", "jsonl"):
            records = list(_json_records(path, text, fmt))
            text_key, label_key = _pick_columns(path, _record_keys(records), cfg)
            examples = [_cls_record(path, line, rec, text_key, label_key) for line, rec in records]
        elif fmt == "at":
            examples = _read_at(path, text)
        else:
            raise DataError(path, f"format {fmt!r} is not supported for classification; use csv, tsv, json, jsonl or at")
    if not examples:
        raise DataError(path, "no examples found")
    return examples


def detect_format(path: Path, cfg: DataConfig) -> str:
    if cfg.format not in ("auto", "hub"):
        return cfg.format
    suffix = path.suffix.lower()
    if suffix in EXTENSIONS:
        return EXTENSIONS[suffix]
    if suffix in (".txt", ".iob", ".bio", ""):
        if cfg.task == "ner":
            return "conll"
        first = _first_line(path)
        if "@" in first:
            return "at"
    raise DataError(path, "cannot tell the format from the name; set data.format (--format): csv, tsv, json, jsonl, conll or at")


def read_text(path: Path, encoding: str) -> str:
    """Read a whole file, with a located, actionable error for a wrong encoding."""
    if not path.exists():
        raise DataError(path, "file not found")
    if path.is_dir():
        raise DataError(path, "is a folder, not a data file")
    size = path.stat().st_size
    if size == 0:
        raise DataError(path, "file is empty")
    if size > MAX_FILE_BYTES:
        raise DataError(path, f"file is {size / 1e9:.1f} GB; the limit is {MAX_FILE_BYTES / 1e9:.0f} GB")
    raw = path.read_bytes()
    try:
        text = raw.decode(encoding)
    except LookupError:
        raise DataError(path, f"unknown encoding {encoding!r}") from None
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        hint = " If the file is Latin-1 (e.g. Financial PhraseBank), pass encoding latin-1." if encoding.lower().replace("-", "") in ("utf8",) else ""
        raise DataError(path, f"byte 0x{raw[e.start]:02x} is not valid {encoding}.{hint}", line=line, column=col) from None
    return text.lstrip("\ufeff")  # a UTF-8 byte-order mark is not part of the first field


def split_examples(examples: list[dict], fraction: float, task: str, rng: random.Random, source: str) -> tuple[list[dict], list[dict]]:
    """Seeded split; stratified by label for classification when every class has two members."""
    n_out = max(1, round(len(examples) * fraction))
    if len(examples) - n_out < 1:
        raise DataError(source, f"only {len(examples)} examples: too few to split off {fraction:.0%}")
    order = list(range(len(examples)))
    rng.shuffle(order)
    if task == "qa":
        # Whole articles (or passages) go to one side, so no context is in two splits.
        groups: dict[str, list[int]] = {}
        for i in range(len(examples)):
            groups.setdefault(examples[i].get("title") or examples[i]["context"], []).append(i)
        keys = sorted(groups)
        rng.shuffle(keys)
        if len(keys) < 2:
            raise DataError(source, "all questions share one article/context: too few to split by article")
        out_set = set()
        for key in keys[:-1]:
            if len(out_set) >= n_out:
                break
            out_set.update(groups[key])
    elif task == "classification":
        by_label: dict[str, list[int]] = {}
        for i in order:
            by_label.setdefault(examples[i]["label"], []).append(i)
        if all(len(v) >= 2 for v in by_label.values()):
            # Largest-remainder allocation: each class gives its share, at least one example.
            out: list[int] = []
            for idx in by_label.values():
                out.extend(idx[: max(1, round(len(idx) * fraction))])
            out_set = set(out)
        else:
            out_set = set(order[:n_out])
    else:
        out_set = set(order[:n_out])
    kept = [ex for i, ex in enumerate(examples) if i not in out_set]
    held = [ex for i, ex in enumerate(examples) if i in out_set]
    return kept, held


def subsample(examples: list[dict], n: int | None, rng: random.Random) -> list[dict]:
    """A seeded random subset of n examples, kept in file order."""
    if n is None or n >= len(examples):
        return examples
    keep = sorted(rng.sample(range(len(examples)), n))
    return [examples[i] for i in keep]


def build_labels(task: str, examples: list[dict], source: str) -> list[str]:
    if task in ("qa", "dialogue"):
        return []  # answers are spans of the context / generated text, not classes
    if task == "ner":
        tags = {t for ex in examples for t in ex["tags"]}
        # "O" first, then by entity type, B- before I- (the order people read a tag set in).
        def key(tag: str) -> tuple:
            prefix, _, kind = tag.partition("-")
            return (tag != "O", kind, "BIES".find(prefix) if prefix in "BIES" else 9, tag)

        return sorted(tags, key=key)
    labels = {ex["label"] for ex in examples}
    if len(labels) < 2:
        raise DataError(source, f"the training data has only one label ({', '.join(labels)}); classification needs two or more")
    if all(re.fullmatch(r"-?\d+", lab) for lab in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def check_labels(task: str, examples: list[dict], labels: list[str], source: str) -> None:
    if task in ("qa", "dialogue"):
        return
    known = set(labels)
    for ex in examples:
        seen = ex["tags"] if task == "ner" else [ex["label"]]
        for lab in seen:
            if lab not in known:
                raise DataError(
                    ex.get("file", source),
                    f"label {lab!r} does not occur in the training data (known: {', '.join(labels)})",
                    line=ex.get("line"),
                )


def load_hub_splits(cfg: DataConfig) -> dict[str, list[dict]]:
    """Load a `datasets` id (needs the Hub or a local `datasets` cache)."""
    import datasets

    try:
        dd = datasets.load_dataset(cfg.train, cfg.hub_config)
    except Exception as e:  # noqa: BLE001  (offline, unknown id, gated...: all mean "cannot use this id here")
        raise DataError(cfg.train, f"could not load this dataset id with `datasets` ({type(e).__name__}: {e}). "
                        "Offline? Give a local file instead.") from None
    out = {}
    for split, ds in dd.items():
        name = {"dev": "validation", "valid": "validation"}.get(split, split)
        rows = _hub_rows(ds, cfg)
        out[name] = rows
    if "train" not in out:
        raise DataError(cfg.train, f"dataset has no 'train' split (splits: {', '.join(dd)})")
    return out


# ---- helpers ------------------------------------------------------------------------------------
def _is_hub(name: str, fmt: str) -> bool:
    if fmt == "hub":
        return True
    return fmt == "auto" and not Path(name).exists() and "/" in name and bool(HUB_ID.match(name)) and not Path(name).suffix


def _first_line(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            for raw in f:
                if raw.strip():
                    return raw.decode("latin-1")
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    return ""


def _pick_column(path: Path, columns: list[str], wanted: str | None, candidates: tuple[str, ...], role: str,
                 field_name: str, fallback: str | None = None, hint: str = "") -> str:
    """The column for `role`: as configured (it must exist), else the first common name present
    (case-insensitive), else `fallback`; an error naming the columns and the field to set."""
    if wanted is not None:
        if wanted not in columns:
            raise DataError(path, f"{role} column {wanted!r} (data.{field_name}) not found; columns are: {', '.join(columns)}")
        return wanted
    lower = {c.lower(): c for c in columns}
    for cand in candidates:
        if cand in lower:
            return lower[cand]
    if fallback is not None:
        return fallback
    raise DataError(path, f"{hint}cannot tell which column is the {role}; columns are: {', '.join(columns)}. Set data.{field_name}")


def _pick_columns(path: Path, columns: list[str], cfg: DataConfig) -> tuple[str, str]:
    """Classification's text and label columns (with exactly two columns: text first, label second)."""
    two = len(columns) == 2
    text_col = _pick_column(path, columns, cfg.text_column, TEXT_COLUMNS, "text", "text_column", columns[0] if two else None)
    label_col = _pick_column(path, columns, cfg.label_column, LABEL_COLUMNS, "label", "label_column", columns[1] if two else None)
    if text_col == label_col:
        raise DataError(path, f"text and label column are both {text_col!r}; set data.text_column / data.label_column")
    return text_col, label_col


def _cls_example(path: Path, line: int, text: Any, label: Any, text_col: str, label_col: str) -> dict:
    if text is None or not str(text).strip():
        raise DataError(path, "empty text", line=line, column=text_col)
    if label is None or (isinstance(label, str) and not label.strip()):
        raise DataError(path, "empty label", line=line, column=label_col)
    if isinstance(label, (list, dict)):
        raise DataError(path, f"label must be a single value, got {type(label).__name__}", line=line, column=label_col)
    if isinstance(label, bool) or isinstance(label, float) and label.is_integer():
        label = int(label)
    return {"text": str(text), "label": str(label).strip(), "line": line, "file": str(path)}


def _read_delimited(path: Path, text: str, delimiter: str, cfg: DataConfig) -> list[dict]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(path, "no header row") from None
    except csv.Error as e:
        raise DataError(path, f"not valid {'CSV' if delimiter == ',' else 'TSV'}: {e}", line=reader.line_num) from None
    header = [h.strip() for h in header]
    text_col, label_col = _pick_columns(path, header, cfg)
    ti, li = header.index(text_col), header.index(label_col)
    examples = []
    start = reader.line_num + 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise DataError(path, f"not valid {'CSV' if delimiter == ',' else 'TSV'}: {e}", line=start) from None
        line, start = start, reader.line_num + 1  # a quoted field may span lines: report the first
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise DataError(path, f"row has {len(row)} fields but the header has {len(header)}", line=line)
        examples.append(_cls_example(path, line, row[ti], row[li], text_col, label_col))
    return examples


def _json_records(path: Path, text: str, fmt: str):
    """Yield (line, record) pairs. For a JSON array the 'line' is the record's line in the file."""
    if fmt == "jsonl":
        for i, raw in enumerate(text.splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError as e:
                raise DataError(path, f"not valid JSON: {e.msg}", line=i, column=e.colno) from None
            if not isinstance(rec, dict):
                raise DataError(path, f"each line must be a JSON object, got {type(rec).__name__}", line=i)
            yield i, rec
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, f"not valid JSON: {e.msg}", line=e.lineno, column=e.colno) from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(path, "expected a list of records, or an object holding exactly one list of records")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(path, f"expected a list of records, got {type(data).__name__}")
    # Line numbers of array elements: the decoder's positions for each top-level object.
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise DataError(path, f"record {i + 1} must be an object, got {type(rec).__name__}")
    lines = _array_element_lines(text, len(data))
    yield from zip(lines, data, strict=False)


def _array_element_lines(text: str, n: int) -> list[int]:
    """Line on which each record of a JSON array (top level, or wrapped in an object) starts."""
    target = 3 if text.lstrip().startswith("{") else 2  # nesting depth of a record's opening brace
    lines, depth, line, in_str, esc = [], 0, 1, False, False
    for ch in text:
        if ch == "\n":
            line += 1
        elif in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if ch == "{" and depth == target:
                lines.append(line)
        elif ch in "]}":
            depth -= 1
    return lines if len(lines) == n else [None] * n  # unreachable for JSON that parsed


def _record_keys(records: list[tuple[int, dict]]) -> list[str]:
    keys: dict[str, None] = {}
    for _, rec in records[:100]:
        keys.update(dict.fromkeys(rec))
    return list(keys)


def _cls_record(path: Path, line: int, rec: dict, text_key: str, label_key: str) -> dict:
    for key in (text_key, label_key):
        if key not in rec:
            raise DataError(path, f"record has no {key!r} field (fields: {', '.join(rec)})", line=line)
    return _cls_example(path, line, rec[text_key], rec[label_key], text_key, label_key)


def _read_at(path: Path, text: str) -> list[dict]:
    examples = []
    for i, raw in enumerate(text.splitlines(), start=1):
        raw = raw.strip()
        if not raw:
            continue
        sentence, sep, label = raw.rpartition("@")
        if not sep:
            raise DataError(path, "expected 'text@label' (no '@' on this line)", line=i)
        examples.append(_cls_example(path, i, sentence.strip(), label, "text", "label"))
    return examples


def _conll_column(value: str | None, default: int, name: str) -> int:
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise DataError(f"data.{name}", f"for CoNLL files this is a column index (0 = first, -1 = last), got {value!r}") from None


def _read_conll(path: Path, text: str, cfg: DataConfig) -> list[dict]:
    tok_col = _conll_column(cfg.token_column, 0, "token_column")
    tag_col = _conll_column(cfg.tag_column, -1, "tag_column")
    need = max(tok_col if tok_col >= 0 else -tok_col - 1, tag_col if tag_col >= 0 else -tag_col - 1) + 1
    examples: list[dict] = []
    tokens: list[str] = []
    tags: list[str] = []
    start = 0

    def flush() -> None:
        if tokens:
            examples.append({"tokens": list(tokens), "tags": list(tags), "line": start, "file": str(path)})
            tokens.clear()
            tags.clear()

    for i, raw in enumerate(text.splitlines(), start=1):
        cols = raw.split()
        if not cols:
            flush()
            continue
        if cols[0] == "-DOCSTART-":
            flush()
            continue
        if len(cols) < max(need, 2):
            raise DataError(path, f"expected at least {max(need, 2)} whitespace-separated columns (token ... tag), found {len(cols)}", line=i)
        if not tokens:
            start = i
        tokens.append(cols[tok_col])
        tags.append(cols[tag_col])
    flush()
    return examples


def _ner_record(path: Path, line: int, rec: dict, cfg: DataConfig) -> dict:
    def key(wanted: str | None, candidates: tuple[str, ...], role: str, cfg_field: str) -> str:
        if wanted is not None:
            if wanted not in rec:
                raise DataError(path, f"record has no {wanted!r} field (data.{cfg_field}); fields: {', '.join(rec)}", line=line)
            return wanted
        for cand in candidates:
            if cand in rec:
                return cand
        raise DataError(path, f"record has no {role} list ({' / '.join(candidates)}); fields: {', '.join(rec)}. Set data.{cfg_field}", line=line)

    tk = key(cfg.token_column, TOKEN_KEYS, "token", "token_column")
    gk = key(cfg.tag_column, TAG_KEYS, "tag", "tag_column")
    tokens, tags = rec[tk], rec[gk]
    if not isinstance(tokens, list) or not isinstance(tags, list):
        raise DataError(path, f"{tk!r} and {gk!r} must be lists", line=line)
    if len(tokens) != len(tags):
        raise DataError(path, f"{len(tokens)} tokens but {len(tags)} tags", line=line, column=gk)
    if not tokens:
        raise DataError(path, "empty token list", line=line, column=tk)
    if not all(isinstance(t, str) for t in tags):
        raise DataError(path, "tags must be strings such as 'B-PER' (numeric tags need their names)", line=line, column=gk)
    if any(not isinstance(t, str) or not t.strip() for t in tokens):
        raise DataError(path, "tokens must be non-empty strings", line=line, column=tk)
    return {"tokens": tokens, "tags": tags, "line": line, "file": str(path)}


def _hub_rows(ds, cfg: DataConfig) -> list[dict]:
    """Convert one `datasets` split to examples, mapping ClassLabel ids to their names."""
    import datasets

    cols = ds.column_names
    fake = Path(f"{cfg.train} (hub)")
    if cfg.task == "ner":
        tk = cfg.token_column or next((k for k in TOKEN_KEYS if k in cols), None)
        gk = cfg.tag_column or next((k for k in TAG_KEYS if k in cols), None)
        if tk is None or gk is None:
            raise DataError(fake, f"cannot find token/tag columns among {', '.join(cols)}")
        feat = ds.features[gk]
        names = getattr(getattr(feat, "feature", None), "names", None)
        rows = []
        for i, rec in enumerate(ds):
            tags = [names[t] for t in rec[gk]] if names else rec[gk]
            rows.append(_ner_record(fake, i + 1, {tk: rec[tk], gk: tags}, cfg))
        return rows
    text_col, label_col = _pick_columns(fake, cols, cfg)
    feat = ds.features[label_col]
    names = feat.names if isinstance(feat, datasets.ClassLabel) else None
    return [
        _cls_example(fake, i + 1, rec[text_col], names[rec[label_col]] if names else rec[label_col], text_col, label_col)
        for i, rec in enumerate(ds)
    ]


def label_counts(task: str, examples: list[dict]) -> Counter:
    if task in ("qa", "dialogue"):
        return Counter()
    if task == "ner":
        return Counter(t for ex in examples for t in ex["tags"])
    return Counter(ex["label"] for ex in examples)


# ---- extractive QA ------------------------------------------------------------------------------
def _read_qa(path: Path, text: str, fmt: str, cfg: DataConfig) -> list[dict]:
    if fmt == "json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(path, f"not valid JSON: {e.msg}", line=e.lineno, column=e.colno) from None
        if isinstance(data, dict) and isinstance(data.get("data"), list) and data["data"] and "paragraphs" in data["data"][0]:
            return _read_squad(path, text, data)
    records = _records(path, text, fmt, "QA")
    if not records:
        return []
    keys = _record_keys(records)

    def pick(wanted: str | None, candidates: tuple[str, ...], role: str, field_name: str) -> str:
        return _pick_column(path, keys, wanted, candidates, role, field_name)

    qk = pick(cfg.question_column, QUESTION_COLUMNS, "question", "question_column")
    ck = pick(cfg.context_column, CONTEXT_COLUMNS, "context", "context_column")
    ak = pick(cfg.answer_column, ANSWER_COLUMNS, "answer", "answer_column")
    nested = all(isinstance(rec.get(ak), dict) for _, rec in records[:20])
    sk = None if nested else pick(cfg.answer_start_column, ANSWER_START_COLUMNS, "answer start", "answer_start_column")
    examples = []
    for line, rec in records:
        if nested:
            ans = rec[ak]
            texts, starts = ans.get("text", []), ans.get("answer_start", [])
            if len(texts) != len(starts):
                raise DataError(path, f"{len(texts)} answer texts but {len(starts)} answer starts", line=line, column=ak)
            answers = [{"text": t, "answer_start": s} for t, s in zip(texts, starts)]
        else:
            answers = [{"text": rec.get(ak), "answer_start": rec.get(sk)}]
        examples.append(_qa_example(path, line, str(rec.get("id", line)), rec.get("title"), rec.get(qk), rec.get(ck),
                                    answers, (qk, ck, ak)))
    return examples


def _read_squad(path: Path, text: str, data: dict) -> list[dict]:
    examples = []
    pos = 0
    for a, article in enumerate(data["data"]):
        title = article.get("title") or f"article {a + 1}"
        for paragraph in article.get("paragraphs", []):
            context = paragraph.get("context")
            for qa in paragraph.get("qas", []):
                qid = str(qa.get("id", ""))
                found = text.find(f'"{qid}"', pos) if qid else -1  # ids appear in file order: scan once
                if found >= 0:
                    pos = found
                line = text.count("\n", 0, pos) + 1 if found >= 0 else None
                examples.append(_qa_example(path, line, qid or f"{title}-{len(examples)}", title, qa.get("question"),
                                            context, qa.get("answers", []), ("question", "context", "answers")))
    return examples


def _qa_example(path: Path, line: int | None, qid: str, title: str | None, question: Any, context: Any,
                answers: list, columns: tuple[str, str, str]) -> dict:
    qk, ck, ak = columns
    if not isinstance(question, str) or not question.strip():
        raise DataError(path, f"question {qid}: empty question", line=line, column=qk)
    if not isinstance(context, str) or not context.strip():
        raise DataError(path, f"question {qid}: empty context", line=line, column=ck)
    if not isinstance(answers, list) or not answers:
        raise DataError(path, f"question {qid}: no answer", line=line, column=ak)
    fixed = False
    clean = []
    for ans in answers:
        text, start = ans.get("text") if isinstance(ans, dict) else None, ans.get("answer_start") if isinstance(ans, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise DataError(path, f"question {qid}: empty answer text", line=line, column=ak)
        try:
            start = int(start)
        except (TypeError, ValueError):
            raise DataError(path, f"question {qid}: answer start {start!r} is not a number", line=line, column=ak) from None
        if context[start:start + len(text)] != text:
            hits = [m.start() for m in re.finditer(re.escape(text), context)]
            if not hits:
                raise DataError(path, f"question {qid}: answer {text!r} does not occur in its context", line=line, column=ak)
            start, fixed = min(hits, key=lambda h: abs(h - start)), True
        clean.append({"text": text, "answer_start": start})
    return {"id": qid, "title": title, "question": question.strip(), "context": context, "answers": clean,
            "fixed": fixed, "line": line, "file": str(path)}


# ---- dialogue -----------------------------------------------------------------------------------
def _records(path: Path, text: str, fmt: str, task_name: str) -> list[tuple[int, dict]]:
    """(line, record) pairs of a JSON, JSONL, CSV or TSV file of records."""
    if fmt in ("json", "jsonl"):
        return list(_json_records(path, text, fmt))
    if fmt in ("csv", "tsv"):
        return _delimited_records(path, text, fmt)
    raise DataError(path, f"format {fmt!r} is not supported for {task_name}; use json, jsonl, csv or tsv")


def _delimited_records(path: Path, text: str, fmt: str) -> list[tuple[int, dict]]:
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="," if fmt == "csv" else "\t")
    records, start = [], 2
    try:
        for row in reader:
            if None in row:
                raise DataError(path, f"row has more fields than the header ({len(reader.fieldnames)})", line=start)
            records.append((start, row))
            start = reader.line_num + 1
    except csv.Error as e:
        raise DataError(path, f"not valid {fmt.upper()}: {e}", line=start) from None
    return records


def _read_dialogue(path: Path, text: str, fmt: str, cfg: DataConfig) -> list[dict]:
    records = _records(path, text, fmt, "dialogue")
    if not records:
        return []
    keys = _record_keys(records)
    message_key = next((k for k in MESSAGE_KEYS if k in keys), None)
    if message_key is None:
        def pick(wanted: str | None, candidates: tuple[str, ...], role: str, field_name: str) -> str:
            return _pick_column(path, keys, wanted, candidates, role, field_name, hint="no 'messages' list and ")

        pk = pick(cfg.prompt_column, PROMPT_COLUMNS, "prompt", "prompt_column")
        rk = pick(cfg.response_column, RESPONSE_COLUMNS, "response", "response_column")
    examples = []
    for line, rec in records:
        if message_key is not None:
            messages = rec.get(message_key)
            column = message_key
        else:
            for key in (pk, rk):
                if not isinstance(rec.get(key), str) or not rec[key].strip():
                    raise DataError(path, f"empty {key}", line=line, column=key)
            messages = [{"role": "user", "content": rec[pk].strip()}, {"role": "assistant", "content": rec[rk].strip()}]
            column = rk
        examples.append({"messages": _check_messages(path, line, column, messages, cfg.system_prompt), "line": line, "file": str(path)})
    return examples


def _check_messages(path: Path, line: int, column: str, messages: Any, system_prompt: str | None) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(path, "'messages' must be a non-empty list of {role, content}", line=line, column=column)
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise DataError(path, f"message {i + 1}: role must be one of {', '.join(ROLES)}", line=line, column=column)
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            raise DataError(path, f"message {i + 1}: empty content", line=line, column=column)
        clean.append({"role": m["role"], "content": m["content"]})
    if clean[-1]["role"] != "assistant":
        raise DataError(path, "the conversation must end with an assistant turn (what the model learns to say)",
                        line=line, column=column)
    if system_prompt and clean[0]["role"] != "system":
        clean.insert(0, {"role": "system", "content": system_prompt})
    return clean
