"""QMP's JSON input, read the way QEMU reads it: bytes in, messages and parse errors out.

Theory of operation
-------------------
QEMU does not read QMP line by line. Its monitor runs every byte through a
lexer (QEMU ``qobject/json-lexer.c``), hands the tokens to a streamer that
counts braces and brackets (``qobject/json-streamer.c``) and parses the tokens
of one message as soon as both counts are back at zero, or either goes below
zero, or a scalar stands alone at the top level (``qobject/json-parser.c``).
Newlines are only white space. Clients see the consequences, so this module
keeps them:

* ``{"execute": "a"} {"execute": "b"}`` on one line is two commands, and one
  command may be split across any number of reads;
* a byte the lexer refuses (a control character, ``0xff``, a capital letter
  outside a string) ends the message at once with
  ``JSON parse error, stray '...'``; the lexer then skips input up to the next
  structural character (``{ } [ ] , :``) or control character, the recovery
  points QEMU documents (a client resynchronises by sending a newline or 0xff);
* QEMU's extensions are accepted: single-quoted strings and ``\\'``;
  ``\\u0000`` and the modified UTF-8 ``c0 80`` are NUL; non-characters
  (U+FFFE, U+FDD0...) are refused;
* the first parse error of a message is the one reported, in QEMU's words
  (``expecting value``, ``missing : in object pair``, ``duplicate key``...).

The lexer is a table of ``(state, byte) -> step`` (:data:`_TABLE`); runs of
ordinary string bytes and white space are consumed with one regular
expression each, so a long string costs one ``re`` call, not one Python
iteration per byte.

Nothing here does I/O: :meth:`QmpInputParser.feed` takes whatever bytes
arrived and returns the messages they completed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

#: Bytes of one message's tokens (white space between tokens not counted, as
#: QEMU counts). QEMU allows 64 MiB; the commands livemig serves (migration
#: control, queries) are under 4 KiB, and the largest argument a management
#: tool sends (a block-bitmap-mapping list, a long URI list) stays far below
#: 1 MiB. Past this the client is cut off: the rest of the message could only
#: be parsed as a stream of errors.
MAX_QMP_MESSAGE = 1 << 20

#: Open braces plus open brackets in one message; QEMU's MAX_NESTING, with its
#: error text. It also bounds the parser's explicit stack.
MAX_QMP_NESTING = 1024


class Token(IntEnum):
    """What the lexer hands to the streamer (QEMU's JSONTokenType)."""

    LCURLY = 1
    RCURLY = 2
    LSQUARE = 3
    RSQUARE = 4
    COLON = 5
    COMMA = 6
    STRING = 7
    INTEGER = 8
    FLOAT = 9
    KEYWORD = 10
    ERROR = 11


@dataclass(frozen=True)
class Message:
    """One complete JSON value (not necessarily an object: the session checks that)."""

    value: Any


@dataclass(frozen=True)
class ParseFailure:
    """Input that is not JSON; ``desc`` is QEMU's error text for it."""

    desc: str


@dataclass(frozen=True)
class InputTooLarge:
    """A message grew past :data:`MAX_QMP_MESSAGE`; the parser accepts nothing after it."""

    desc: str


ParsedItem = Message | ParseFailure | InputTooLarge


class _Lex(IntEnum):
    """Lexer states (QEMU's IN_* states, named for what has been read)."""

    START = 0
    DQ_STRING = 1
    DQ_ESCAPE = 2
    SQ_STRING = 3
    SQ_ESCAPE = 4
    ZERO = 5  # "0" or "-0": a digit after it is an error, "e" ends the number
    INTEGER = 6  # [1-9][0-9]*
    MINUS = 7
    POINT = 8  # a digit must follow
    FRACTION = 9
    EXP = 10  # after e/E: sign or digit
    EXP_SIGN = 11  # a digit must follow
    EXP_DIGITS = 12
    KEYWORD = 13
    RECOVERY = 14  # after an error: skip to a resynchronisation point


class _Do(IntEnum):
    """What a (state, byte) step does."""

    ERROR = 0  # take the byte into the token, report it, recover
    GOTO = 1  # take the byte, go to state ``arg``
    EMIT = 2  # take the byte, the token (kind ``arg``) is complete
    EMIT_BEFORE = 3  # the token (kind ``arg``) ended before this byte; read it again
    SKIP = 4  # white space at the start of a token, or a byte skipped in recovery
    RESYNC = 5  # recovery ends before this byte; read it again from START


_Step = tuple[_Do, int]
_ERROR: _Step = (_Do.ERROR, 0)
_STRUCTURAL = {b"{": Token.LCURLY, b"}": Token.RCURLY, b"[": Token.LSQUARE,
               b"]": Token.RSQUARE, b":": Token.COLON, b",": Token.COMMA}
_WHITE = b" \t\r\n"
_DIGITS = b"0123456789"
_LOWER = bytes(range(ord("a"), ord("z") + 1))


def _row(default: _Step, *spans: tuple[bytes | range, _Step],
         terminal: Token | None = None) -> list[_Step]:
    """One state's 256 steps. ``terminal``: any other ASCII byte ends a token of that kind
    (QEMU's TERMINAL: the byte belongs to what follows), while bytes >= 0x80 stay errors."""
    row = [default] * 256
    if terminal is not None:
        row[:0x80] = [(_Do.EMIT_BEFORE, terminal)] * 0x80
    for chars, step in spans:
        for b in chars:
            row[b] = step
    return row


def _string_row(quote: bytes, escape_state: _Lex) -> list[_Step]:
    same = _Lex.DQ_STRING if quote == b'"' else _Lex.SQ_STRING
    return _row(_ERROR, (range(0x20, 0xFE), (_Do.GOTO, same)),
                (b"\\", (_Do.GOTO, escape_state)), (quote, (_Do.EMIT, Token.STRING)))


def _goto(state: _Lex) -> _Step:
    return (_Do.GOTO, state)


_TABLE: dict[_Lex, list[_Step]] = {
    _Lex.START: _row(
        _ERROR,
        (b'"', _goto(_Lex.DQ_STRING)), (b"'", _goto(_Lex.SQ_STRING)),
        (b"0", _goto(_Lex.ZERO)), (b"123456789", _goto(_Lex.INTEGER)),
        (b"-", _goto(_Lex.MINUS)), (_LOWER, _goto(_Lex.KEYWORD)), (_WHITE, (_Do.SKIP, 0)),
        *((ch, (_Do.EMIT, tok)) for ch, tok in _STRUCTURAL.items()),
    ),
    _Lex.DQ_STRING: _string_row(b'"', _Lex.DQ_ESCAPE),
    _Lex.DQ_ESCAPE: _row(_ERROR, (range(0x20, 0xFE), _goto(_Lex.DQ_STRING))),
    _Lex.SQ_STRING: _string_row(b"'", _Lex.SQ_ESCAPE),
    _Lex.SQ_ESCAPE: _row(_ERROR, (range(0x20, 0xFE), _goto(_Lex.SQ_STRING))),
    _Lex.ZERO: _row(_ERROR, (_DIGITS, _ERROR), (b".", _goto(_Lex.POINT)),
                    terminal=Token.INTEGER),
    _Lex.INTEGER: _row(_ERROR, (_DIGITS, _goto(_Lex.INTEGER)), (b".", _goto(_Lex.POINT)),
                       (b"eE", _goto(_Lex.EXP)), terminal=Token.INTEGER),
    _Lex.MINUS: _row(_ERROR, (b"0", _goto(_Lex.ZERO)), (b"123456789", _goto(_Lex.INTEGER))),
    _Lex.POINT: _row(_ERROR, (_DIGITS, _goto(_Lex.FRACTION))),
    _Lex.FRACTION: _row(_ERROR, (_DIGITS, _goto(_Lex.FRACTION)), (b"eE", _goto(_Lex.EXP)),
                        terminal=Token.FLOAT),
    _Lex.EXP: _row(_ERROR, (b"+-", _goto(_Lex.EXP_SIGN)), (_DIGITS, _goto(_Lex.EXP_DIGITS))),
    _Lex.EXP_SIGN: _row(_ERROR, (_DIGITS, _goto(_Lex.EXP_DIGITS))),
    _Lex.EXP_DIGITS: _row(_ERROR, (_DIGITS, _goto(_Lex.EXP_DIGITS)), terminal=Token.FLOAT),
    _Lex.KEYWORD: _row(_ERROR, (_LOWER, _goto(_Lex.KEYWORD)), terminal=Token.KEYWORD),
    _Lex.RECOVERY: _row(
        (_Do.SKIP, 0),
        (range(0x20), (_Do.RESYNC, 0)), (b"\xfe\xff", (_Do.RESYNC, 0)),
        (b"{}[],:", (_Do.RESYNC, 0)),
    ),
}

#: Runs that one regular expression consumes: ordinary string bytes, white
#: space between tokens, bytes skipped in recovery. Each must agree with the
#: table (the table alone would give the same result, only slower).
_RUNS: dict[_Lex, re.Pattern[bytes]] = {
    _Lex.DQ_STRING: re.compile(rb'[\x20\x21\x23-\x5b\x5d-\xfd]+'),
    _Lex.SQ_STRING: re.compile(rb"[\x20-\x26\x28-\x5b\x5d-\xfd]+"),
    _Lex.START: re.compile(rb"[ \t\r\n]+"),
    _Lex.RECOVERY: re.compile(rb"[^\x00-\x1f\xfe\xff{}\[\],:]+"),
}

#: Bytes that end a number or keyword in every state that can end one (none of them
#: continues a number or keyword, all are ASCII, so the table would end the token
#: there too).
_ENDS_TOKEN = rb"""(?=[ \t\r\n,:{}\[\]"'])"""

#: Whole tokens at START, each with what ends it, so that a message of many small
#: tokens costs one ``re`` call per token instead of one Python step per byte. A
#: token that is not whole in the bytes at hand, or is an error, falls through to
#: the table. ``0`` takes no exponent (QEMU's lexer: ``0e1`` is ``0`` then ``e1``).
_FAST_TOKEN = re.compile(
    rb"(?P<white>[ \t\r\n]+)"
    rb"|(?P<structural>[{}\[\],:])"
    rb'|(?P<string>"(?:[\x20\x21\x23-\x5b\x5d-\xfd]|\\[\x20-\xfd])*"'
    rb"|'(?:[\x20-\x26\x28-\x5b\x5d-\xfd]|\\[\x20-\xfd])*')"
    rb"|(?P<number>-?(?:0(?:\.[0-9]+(?:[eE][-+]?[0-9]+)?)?"
    rb"|[1-9][0-9]*(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?))" + _ENDS_TOKEN +
    rb"|(?P<keyword>[a-z]+)" + _ENDS_TOKEN
)
_FLOAT_MARKS = re.compile(rb"[.eE]")


class QmpInputParser:
    """Turns a client's byte stream into QMP messages, as QEMU's monitor does.

    Feed it whatever ``recv`` returned; it keeps the unfinished token and the
    tokens of the unfinished message between calls. After an
    :class:`InputTooLarge` it is poisoned: the connection has to be dropped,
    and :meth:`feed` raises ``RuntimeError`` if called again.
    """

    def __init__(self, max_message: int = MAX_QMP_MESSAGE) -> None:
        self._max_message = max_message
        self._state = _Lex.START
        self._token = bytearray()
        self._tokens: list[tuple[Token, bytes]] = []
        self._size = 0  # bytes in self._tokens
        self._braces = 0
        self._brackets = 0
        self._out: list[ParsedItem] = []
        self._poisoned = False

    def feed(self, data: bytes) -> list[ParsedItem]:
        """Everything ``data`` completes, in order (possibly nothing)."""
        if self._poisoned:
            raise RuntimeError("QMP input parser used after the input grew too large")
        self._out = []
        table = _TABLE
        runs = _RUNS
        fast = _FAST_TOKEN
        pos, end = 0, len(data)
        token = self._token
        while pos < end:
            if self._over_limit(len(token)):
                break
            state = self._state
            if state is _Lex.START:
                m = fast.match(data, pos)
                if m is not None:
                    pos = m.end()
                    group = m.lastgroup
                    if group != "white":
                        text = m.group()
                        if group == "structural":
                            kind = _STRUCTURAL[text]
                        elif group == "number":
                            kind = Token.FLOAT if _FLOAT_MARKS.search(text) else Token.INTEGER
                        else:
                            kind = Token.STRING if group == "string" else Token.KEYWORD
                        self._token_done(kind, text)
                    continue
            run = runs.get(state)
            if run is not None:
                m = run.match(data, pos)
                if m is not None:
                    if state in (_Lex.DQ_STRING, _Lex.SQ_STRING):
                        token += m.group()
                    pos = m.end()
                    continue
            do, arg = table[state][data[pos]]
            if do is _Do.GOTO:
                token.append(data[pos])
                self._state = _Lex(arg)
            elif do is _Do.EMIT:
                token.append(data[pos])
                self._token_done(Token(arg), bytes(token))
                token.clear()
                self._state = _Lex.START
            elif do is _Do.EMIT_BEFORE:
                self._token_done(Token(arg), bytes(token))
                token.clear()
                self._state = _Lex.START
                continue  # the same byte again, from START
            elif do is _Do.ERROR:
                token.append(data[pos])
                self._token_done(Token.ERROR, bytes(token))
                token.clear()
                self._state = _Lex.RECOVERY
            elif do is _Do.RESYNC:
                self._state = _Lex.START
                continue
            pos += 1  # _Do.SKIP, and every step that took the byte
        if not self._poisoned:
            self._over_limit(len(token))
        out, self._out = self._out, []
        return out

    def _over_limit(self, partial: int) -> bool:
        """Poison the parser once the message (with the token being read) is too large."""
        if self._size + partial <= self._max_message:
            return False
        self._poisoned = True
        self._out.append(InputTooLarge(
            f"QMP input message too large (more than {self._max_message} bytes)"))
        return True

    def _token_done(self, kind: Token, text: bytes) -> None:
        """QEMU's streamer: collect tokens until the counts say the message is whole."""
        if kind not in _BRACKETING and (self._braces or self._brackets):
            # Inside a message, a scalar, comma or colon only joins it (the common case).
            self._tokens.append((kind, text))
            self._size += len(text)
            return
        if kind is Token.ERROR:
            self._reset()
            self._out.append(ParseFailure(f"JSON parse error, stray '{_c_text(text)}'"))
            return
        if kind is Token.LCURLY:
            self._braces += 1
        elif kind is Token.RCURLY:
            self._braces -= 1
        elif kind is Token.LSQUARE:
            self._brackets += 1
        elif kind is Token.RSQUARE:
            self._brackets -= 1
        self._tokens.append((kind, text))
        self._size += len(text)
        if self._braces < 0 or self._brackets < 0 or (self._braces == 0 and self._brackets == 0):
            tokens = self._tokens
            self._reset()
            try:
                self._out.append(Message(parse_tokens(tokens)))
            except _ParseError as e:
                self._out.append(ParseFailure(f"JSON parse error, {e}"))
        elif self._braces + self._brackets > MAX_QMP_NESTING:
            self._reset()
            self._out.append(ParseFailure("JSON nesting depth limit exceeded"))

    def _reset(self) -> None:
        self._tokens = []
        self._size = 0
        self._braces = self._brackets = 0


#: Tokens that change the counts, or end the message whatever the counts.
_BRACKETING = frozenset({Token.LCURLY, Token.RCURLY, Token.LSQUARE, Token.RSQUARE,
                         Token.ERROR})


def _c_text(raw: bytes) -> str:
    """A token as QEMU prints it: a C string (ends at NUL), invalid UTF-8 replaced."""
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


class _ParseError(Exception):
    """The first thing wrong with a message's tokens, in QEMU's words."""


_KEYWORDS = {b"true": True, b"false": False, b"null": None}
_VALUE_START = frozenset({Token.LCURLY, Token.LSQUARE, Token.STRING, Token.INTEGER,
                          Token.FLOAT, Token.KEYWORD})


class _Frame:
    """An object or array being filled; ``key`` is the member awaiting its value."""

    __slots__ = ("container", "key", "want_key")

    def __init__(self, container: dict[str, Any] | list[Any]) -> None:
        self.container = container
        self.key: str | None = None
        self.want_key = isinstance(container, dict)


def parse_tokens(tokens: list[tuple[Token, bytes]]) -> Any:
    """One message's tokens to a Python value; raises :class:`_ParseError`.

    Iterative (an explicit stack), so the nesting limit, not Python's
    recursion limit, decides how deep a message may go.
    """
    pos = 0

    def take() -> tuple[Token, bytes]:
        nonlocal pos
        if pos >= len(tokens):
            raise _ParseError("premature EOI")
        pos += 1
        return tokens[pos - 1]

    def peek_is(kind: Token) -> bool:
        return pos < len(tokens) and tokens[pos][0] is kind

    stack: list[_Frame] = []
    while True:
        # A value starts here.
        kind, text = take()
        value: Any
        if kind is Token.LCURLY or kind is Token.LSQUARE:
            closer = Token.RCURLY if kind is Token.LCURLY else Token.RSQUARE
            empty: dict[str, Any] | list[Any] = {} if kind is Token.LCURLY else []
            if not peek_is(closer):
                stack.append(_Frame(empty))
                continue
            take()
            value = empty
        elif kind not in _VALUE_START:
            raise _ParseError("expecting value")
        else:
            value = _literal(kind, text)
        # A value is complete: put it where it belongs, then read what follows it.
        while True:
            if not stack:
                return value
            frame = stack[-1]
            c = frame.container
            if isinstance(c, list):
                c.append(value)
                kind, _ = take()
                if kind is Token.COMMA:
                    break
                if kind is not Token.RSQUARE:
                    raise _ParseError("expected separator in list")
            elif frame.want_key:
                if not isinstance(value, str):
                    raise _ParseError("key is not a string in object")
                if take()[0] is not Token.COLON:
                    raise _ParseError("missing : in object pair")
                frame.key, frame.want_key = value, False
                break
            else:
                assert frame.key is not None
                if frame.key in c:
                    raise _ParseError("duplicate key")
                c[frame.key] = value
                kind, _ = take()
                if kind is Token.COMMA:
                    frame.want_key = True
                    break
                if kind is not Token.RCURLY:
                    raise _ParseError("expected separator in dict")
            stack.pop()
            value = c


_INT64 = range(-(1 << 63), 1 << 63)
_UINT64_MAX = (1 << 64) - 1


def _literal(kind: Token, text: bytes) -> Any:
    if kind is Token.STRING:
        return _string(text)
    if kind is Token.INTEGER:
        # As QEMU's QNum: int64 if it fits, else uint64, else a double.
        n = int(text)
        return n if n in _INT64 or 0 <= n <= _UINT64_MAX else float(text)
    if kind is Token.FLOAT:
        return float(text)
    try:
        return _KEYWORDS[text]
    except KeyError:
        raise _ParseError(f"invalid keyword '{_c_text(text)}'") from None


_SIMPLE_ESCAPES = {ord('"'): '"', ord("'"): "'", ord("\\"): "\\", ord("/"): "/",
                   ord("b"): "\b", ord("f"): "\f", ord("n"): "\n", ord("r"): "\r",
                   ord("t"): "\t"}
_HEX4 = re.compile(rb"[0-9a-fA-F]{4}")


def _is_noncharacter(cp: int) -> bool:
    return 0xFDD0 <= cp <= 0xFDEF or (cp & 0xFFFE) == 0xFFFE


def _utf8(raw: bytes) -> str:
    """Raw string bytes; modified UTF-8 as QEMU reads it (c0 80 is NUL)."""
    try:
        text = raw.replace(b"\xc0\x80", b"\0").decode("utf-8")
    except UnicodeDecodeError:
        raise _ParseError("invalid UTF-8 sequence in string") from None
    if any(_is_noncharacter(ord(ch)) for ch in text if ord(ch) >= 0xFDD0):
        raise _ParseError("invalid UTF-8 sequence in string")
    return text


def _string(token: bytes) -> str:
    """A string token (quotes included) to text, with QEMU's escapes and errors."""
    parts: list[str] = []
    i, end = 1, len(token) - 1
    while True:
        j = token.find(b"\\", i, end)
        if j < 0:
            parts.append(_utf8(token[i:end]))
            return "".join(parts)
        parts.append(_utf8(token[i:j]))
        esc = token[j + 1]  # the lexer guarantees a byte after a backslash
        if esc != ord("u"):
            if esc not in _SIMPLE_ESCAPES:
                raise _ParseError("invalid escape sequence in string")
            parts.append(_SIMPLE_ESCAPES[esc])
            i = j + 2
            continue
        cp, i = _unicode_escape(token, j)
        parts.append(chr(cp))


def _unicode_escape(token: bytes, j: int) -> tuple[int, int]:
    """``\\uXXXX`` (or a surrogate pair of them) at ``token[j]``: the code point and
    the index after it. The error quotes what QEMU quotes: the escape read so far
    (cut short, closing quote included, when the token ends first)."""
    cp = _hex4(token, j + 2)
    after = j + 6
    if 0xD800 <= cp <= 0xDBFF and token[after:after + 2] == b"\\u":
        low = _hex4(token, after + 2)
        if 0xDC00 <= low <= 0xDFFF:
            cp = 0x10000 + ((cp & 0x3FF) << 10) + (low & 0x3FF)
            after += 6
        else:
            cp = -1
    if cp < 0 or 0xD800 <= cp <= 0xDFFF or _is_noncharacter(cp):
        raise _ParseError(f"{_c_text(token[j:after])} is not a valid Unicode character")
    return cp, after


def _hex4(token: bytes, at: int) -> int:
    m = _HEX4.match(token, at, at + 4)
    return int(m.group(), 16) if m else -1

