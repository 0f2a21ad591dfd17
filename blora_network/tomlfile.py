"""Reading a TOML file (a preset, an sd-scripts config) with errors that say what is wrong and where.

sd-scripts and our presets use the ``toml`` package (Python 3.10 has no ``tomllib``), whose
messages are often beside the point: an unclosed ``[`` is "string index out of range" (a list)
or "Key group not on a line by itself" (a table header), and an array still open at the end of
the file is read without a word, its last value cut short. Every problem here is one line that
names the file, the line and the fix, raised as the caller's error class.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import toml

from .errors import BLoraError

__all__ = ["read_toml", "parse_toml"]


def read_toml(path: Path, *, what: str, shown: Optional[str] = None, error: type = BLoraError,
              not_found_hint: str = "", syntax_hint: str = "fix the file") -> dict[str, Any]:
    """The parsed document of the TOML file at ``path``; ``what`` names it in messages ("preset file")."""
    shown = str(path) if shown is None else shown
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{what} {shown} not found{not_found_hint}") from None
    except IsADirectoryError:
        raise error(f"{what} {shown} is a folder; give the path of a .toml file") from None
    except UnicodeDecodeError as e:
        raise error(f"{shown}: not a UTF-8 text file ({e.reason} at byte {e.start}); TOML files are UTF-8 text") from None
    except OSError as e:
        raise error(f"{shown}: cannot read the {what} ({e.strerror or e})") from None
    except ValueError:  # a NUL byte in the path: no file system has such a name
        raise error(f"{what} {shown!r}: not a file name (it holds a NUL byte){not_found_hint}") from None
    return parse_toml(text, shown, error=error, syntax_hint=syntax_hint)


def parse_toml(text: str, shown: str, *, error: type = BLoraError, syntax_hint: str = "fix the file") -> dict[str, Any]:
    """``toml.loads`` with the one-line syntax errors described in the module docstring."""
    try:
        doc = toml.loads(text)
    except (toml.TomlDecodeError, IndexError, ValueError, TypeError) as e:
        raise _syntax_error(shown, text, e, error, syntax_hint) from None
    if _unclosed_bracket(text) is not None:  # the toml package reads an array left open at the end of the
        raise _syntax_error(shown, text, ValueError("unclosed"), error, syntax_hint) from None  # file, cutting its last value
    return doc


def _syntax_error(shown: str, text: str, err: Exception, error: type, hint: str) -> BLoraError:
    unclosed = _unclosed_bracket(text)
    if unclosed is not None:
        line, quoted = unclosed
        return error(f"{shown}:{line}: TOML syntax error: the '[' on line {line} ({quoted[:80]!r}) is never closed; "
                     "add the matching ']' (a list ends with ']', a table header such as [blora] closes on its own line)")
    line = getattr(err, "lineno", None)
    col = getattr(err, "colno", None)
    where = f"{shown}:{line}" + (f":{col}" if col else "") if line else shown
    lines = text.splitlines()
    snippet = f" (line {line}: {lines[line - 1].strip()[:80]!r})" if line and 0 < line <= len(lines) else ""
    return error(f"{where}: TOML syntax error: {getattr(err, 'msg', str(err))}{snippet}; {hint}")


def _unclosed_bracket(text: str) -> Optional[tuple[int, str]]:
    """``(line, its text)`` of the first ``[`` that is never closed, outside strings and comments."""
    stack: list[int] = []
    lines = text.splitlines()
    multiline = None  # the delimiter of a multi-line string open since an earlier line
    for n, line in enumerate(lines, 1):
        quote = None
        i = 0
        if multiline:
            end = line.find(multiline)
            if end < 0:
                continue
            i, multiline = end + 3, None
        while i < len(line):
            c = line[i]
            if not quote and line.startswith(('"""', "'''"), i):
                end = line.find(line[i:i + 3], i + 3)
                if end < 0:
                    multiline = line[i:i + 3]
                    break
                i = end + 3
                continue
            if quote:
                if c == "\\" and quote == '"':
                    i += 1
                elif c == quote:
                    quote = None
            elif c in "'\"":
                quote = c
            elif c == "#":
                break
            elif c == "[":
                stack.append(n)
            elif c == "]" and stack:
                stack.pop()
            i += 1
        if stack and stack[-1] == n and line.lstrip().startswith("[") and "=" not in line:
            return n, line.strip()  # a table header must close on its own line
    return (stack[0], lines[stack[0] - 1].strip()) if stack else None
