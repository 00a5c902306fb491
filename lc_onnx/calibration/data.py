"""Calibration data: where feeds come from, and checking them against the model's inputs.

A *feed* is one `{input name: np.ndarray}` run of the model. Accepted sources:

- any iterable of feeds (a list, a generator);
- an `onnxruntime.quantization.CalibrationDataReader` (anything with `get_next()` returning a feed or
  None), used as it is;
- on the command line, `file.py:function` (the function, called without arguments, returns one of the
  above: the Polygraphy data-loader convention), a directory of `.npz` files (one feed per file, keys =
  input names, read in name order) or a single `.npz` file.

Feeds are checked as they stream: the names must be exactly the model's inputs, dtypes equal the declared
ones, ranks and static dimensions match. Every problem is a one-line `UserError`.
"""

from __future__ import annotations

import importlib.util
import itertools
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from lc_onnx.calibration import text
from lc_onnx.errors import UserError, one_line
from lc_onnx.model.protos import dims_of

Feed = dict[str, np.ndarray]
MAX_HELD_OUT = 32


@dataclass(frozen=True)
class InputSpec:
    """A graph input as the data must match it: dtype and dims (int, or None when symbolic)."""

    name: str
    dtype: np.dtype
    dims: tuple[int | None, ...] | None

    def check(self, value: Any, index: int) -> np.ndarray:
        if not isinstance(value, np.ndarray):
            raise UserError(
                f"calibration feed {index}: input {self.name!r} is a {type(value).__name__}, not a numpy array"
            )
        if value.dtype != self.dtype:
            raise UserError(
                f"calibration feed {index}: input {self.name!r} has dtype {value.dtype}, "
                f"the model expects {self.dtype}"
            )
        if self.dims is not None and (
            value.ndim != len(self.dims)
            or any(d is not None and d != s for d, s in zip(self.dims, value.shape))
        ):
            want = "x".join("?" if d is None else str(d) for d in self.dims) or "scalar"
            got = "x".join(str(s) for s in value.shape) or "scalar"
            raise UserError(
                f"calibration feed {index}: input {self.name!r} has shape {got}, the model expects {want}"
            )
        return value


def input_specs(model: onnx.ModelProto) -> dict[str, InputSpec]:
    """The graph inputs a feed must give (initializers listed as inputs are optional overrides: skipped)."""
    initializers = {t.name for t in model.graph.initializer}
    specs = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tt = value.type.tensor_type
        if not value.type.HasField("tensor_type") or not tt.elem_type:
            raise UserError(f"input {value.name!r} is not a tensor; calibration feeds tensors only")
        known = dims_of(value)
        dims = None if known is None else tuple(known)
        specs[value.name] = InputSpec(
            value.name, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)), dims
        )
    return specs


def feeds(data: Any, specs: Mapping[str, InputSpec]) -> Iterator[Feed]:
    """Checked feeds from `data` (an iterable of feeds, a `CalibrationDataReader`, or `TextData`, whose
    lines to fit on are taken), lazily.

    Raises:
        UserError: `data` is not a source of feeds, is empty, or a feed does not fit the model.
    """
    if isinstance(data, text.TextData):
        data = data.feeds(data.train, {name: spec.dtype for name, spec in specs.items()})
    count = 0
    for count, feed in enumerate(_iterate(data), start=1):
        yield check_feed(feed, specs, count - 1)
    if count == 0:
        raise UserError("the calibration data is empty: it gave no feeds")


def _iterate(data: Any) -> Iterator[Any]:
    get_next = getattr(data, "get_next", None)
    if callable(get_next):
        while (feed := get_next()) is not None:
            yield feed
        return
    if isinstance(data, Mapping):
        raise UserError("calibration data must be an iterable of feeds ({input name: array}), got one dict")
    if isinstance(data, (str, bytes, Path)) or not isinstance(data, Iterable):
        raise UserError(
            f"calibration data must be an iterable of feeds or a CalibrationDataReader, got {type(data).__name__}"
        )
    yield from data


def check_feed(feed: Any, specs: Mapping[str, InputSpec], index: int) -> Feed:
    if not isinstance(feed, Mapping):
        raise UserError(f"calibration feed {index} is a {type(feed).__name__}, not a dict of input arrays")
    unknown = [k for k in feed if k not in specs]
    if unknown:
        raise UserError(
            f"calibration feed {index}: {unknown[0]!r} is not an input of the model (inputs: {', '.join(specs)})"
        )
    missing = [k for k in specs if k not in feed]
    if missing:
        raise UserError(f"calibration feed {index}: input {missing[0]!r} is missing")
    return {name: specs[name].check(feed[name], index) for name in specs}


def fit_and_held(
    data: Any, specs: Mapping[str, InputSpec], fit_batches: int | None
) -> tuple[Iterator[Feed], list[Feed]]:
    """Feeds to fit on (streamed) and held-out feeds: text holds out its own lines (see `text`), any
    other data is cut by `split`."""
    if not isinstance(data, text.TextData):
        return split(feeds(data, specs), fit_batches)
    if fit_batches is not None:
        raise UserError("{calib_batches} does not apply to text data: it holds out lines by their CRC-32",
                        params=["calib_batches"])  # fmt: skip
    dtypes = {name: spec.dtype for name, spec in specs.items()}
    lines = data.held[: MAX_HELD_OUT * text.BATCH]  # held-out feeds live in memory
    held = [check_feed(f, specs, i) for i, f in enumerate(data.feeds(lines, dtypes))]
    return feeds(data, specs), held


class Passes:
    """The feeds to fit on, to be read once or more, and the held-out feeds (in memory).

    `fit()` streams the fit feeds; the first call also fills `held` (read it after the stream ends).
    Later calls read the data again where it can be: a list or other re-iterable, text, a reader with
    `rewind()`, the command line's `.npz` files and `file.py:function` (called again); `replayable` says
    whether it can.
    """

    def __init__(self, data: Any, specs: Mapping[str, InputSpec], fit_batches: int | None) -> None:
        self.data, self.specs, self.fit_batches = data, specs, fit_batches
        self.held: list[Feed] = []
        self.reads = 0
        self.replayable = (
            isinstance(data, text.TextData)
            or callable(getattr(data, "rewind", None))
            or (isinstance(data, Iterable) and iter(data) is not data and not hasattr(data, "get_next"))
        )

    def fit(self) -> Iterator[Feed]:
        if self.reads and not self.replayable:
            raise AssertionError("the calibration data can be read only once")
        if self.reads and callable(getattr(self.data, "rewind", None)):
            self.data.rewind()
        first = self.reads == 0
        self.reads += 1
        if first:
            stream, self.held = fit_and_held(self.data, self.specs, self.fit_batches)
            return stream
        if isinstance(self.data, text.TextData):
            return feeds(self.data, self.specs)
        return split(feeds(self.data, self.specs), self.fit_batches, keep_held=False)[0]


def split(
    stream: Iterator[Feed], fit_batches: int | None, *, keep_held: bool = True
) -> tuple[Iterator[Feed], list[Feed]]:
    """Cut a stream into feeds to fit on (streamed) and held-out feeds (kept, for selection).

    With `fit_batches` N the first N feeds are fitted and the next ones held out; without it every fourth
    feed is held out. At most `MAX_HELD_OUT` feeds are kept (they live in memory). The held-out list
    fills while the fit iterator is consumed.
    """
    held: list[Feed] = []
    count = 0  # held-out feeds seen

    def fit() -> Iterator[Feed]:
        nonlocal count
        for i, feed in enumerate(stream):
            if fit_batches is not None and i >= fit_batches:
                if count >= MAX_HELD_OUT:
                    return
                count += 1
            elif fit_batches is None and i % 4 == 3 and count < MAX_HELD_OUT:
                count += 1
            else:
                yield feed
                continue
            if keep_held:
                held.append(feed)

    return fit(), held


def load_callable(spec: str, param: str) -> Callable[..., Any]:
    """The function named by `file.py:function`, given as the parameter `param` (errors name it)."""
    what = "{" + param + "}"
    path_text, sep, name = spec.rpartition(":")
    if not sep or not path_text.endswith(".py") or not name.isidentifier():
        raise UserError(f"{what} {spec!r}: expected FILE.py:FUNCTION", params=[param])
    path = Path(path_text)
    if not path.is_file():
        raise UserError(f"{what} {spec!r}: {path}: no such file", params=[param])
    module_name = f"_lc_onnx_user_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.path.insert(0, str(path.resolve().parent))  # so the script can import its neighbours
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        raise UserError(
            f"{what} {spec!r}: importing {path} failed: {type(exc).__name__}: {one_line(exc, 300)}",
            params=[param],
        ) from None
    finally:
        sys.path.remove(str(path.resolve().parent))
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(f"{what} {spec!r}: {path} defines no function {name!r}", params=[param])
    return fn


def from_spec(
    spec: str, *, tokenizer: str | Path | None = None, max_length: int = text.DEFAULT_MAX_LENGTH
) -> Iterable[Any] | text.TextData:
    """The data a spec names (the `data` parameter spelled as text, as on the command line):
    `file.py:function`, a directory of `.npz` files, one `.npz`, or `text:FILE` with a `tokenizer`
    directory (see `text`)."""
    if spec.startswith(text.PREFIX):
        if tokenizer is None:
            raise UserError(
                f"{{data}} {spec}: text needs the model's {{tokenizer}}", params=["data", "tokenizer"]
            )
        return text.TextData.from_files(spec[len(text.PREFIX) :], tokenizer, max_length)
    if tokenizer is not None:
        raise UserError(
            "{tokenizer} applies to text data only ({data} text:FILE)", params=["tokenizer", "data"]
        )
    path = Path(spec)
    if path.is_dir():
        files = sorted(path.glob("*.npz"))
        if not files:
            raise UserError(f"{{data}} {spec}: no .npz files in this directory", params=["data"])
        return _Replay(lambda: _npz_feeds(files))
    if path.suffix == ".npz":
        if not path.is_file():
            raise UserError(f"{{data}} {spec}: no such file", params=["data"])
        return _Replay(lambda: _npz_feeds([path]))
    if ":" not in spec:
        raise UserError(
            f"{{data}} {spec}: no such file or directory (expected FILE.py:FUNCTION, DIR or FILE.npz)",
            params=["data"],
        )
    fn = load_callable(spec, "data")
    return _Replay(lambda: _guarded(fn, spec))


class _Replay:
    """Data that can be read again: each iteration starts a new stream from `make()`."""

    def __init__(self, make: Callable[[], Iterator[Any]]) -> None:
        self.make = make

    def __iter__(self) -> Iterator[Any]:
        return self.make()


def _guarded(fn: Callable[[], Any], spec: str) -> Iterator[Any]:
    """Iterate what a user's data function returns; its exceptions become one-line errors."""
    try:
        data = fn()
        source = _iterate(data)
        while True:
            try:
                feed = next(source)
            except StopIteration:
                return
            yield feed
    except UserError:
        raise
    except Exception as exc:
        raise UserError(
            f"{{data}} {spec}: {type(exc).__name__}: {one_line(exc, 300)}", params=["data"]
        ) from None


def _npz_feeds(files: list[Path]) -> Iterator[Feed]:
    for file in files:
        try:
            with np.load(file, allow_pickle=False) as npz:
                feed = {key: npz[key] for key in npz.files}
        except (OSError, ValueError) as exc:
            raise UserError(f"{file}: not a readable .npz file ({one_line(exc, 300)})") from None
        yield feed


def take(stream: Iterable[Feed], n: int | None) -> Iterator[Feed]:
    return iter(stream) if n is None else itertools.islice(stream, n)
