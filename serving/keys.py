"""`python -m serving.keys`: mint API keys and check a keys file (see serving.auth).

    python -m serving.keys new --name crm --scopes predict,jobs
        prints the new key once (give it to the client) and the line for BANKCHURN_API_KEYS_FILE
    python -m serving.keys hash --name crm --scopes predict      (reads a key on stdin)
        the line for a key you already have
    python -m serving.keys check FILE
        parses a keys file as the service does; exit 1 naming the first bad line

Rotation: mint a new key for the same client under a new name (crm-2026-12), add its line,
hand the key over, remove the old line once the client has switched. The service re-reads the
file within seconds of a change (a Kubernetes Secret volume updates in place).
"""

from __future__ import annotations

import argparse
import secrets
import sys

from serving.auth import SCOPES, KeyFileError, digest, parse_keys

KEY_PREFIX = "bck_"  # recognisable in a leaked file or log by secret scanners
KEY_BYTES = 32  # 256 random bits


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(KEY_BYTES)


def key_line(name: str, scopes: list[str], key: str) -> str:
    """The keys-file line for `key`; checked by the same parser the service uses."""
    line = f"{name}:{','.join(scopes)}:{digest(key)}"
    parse_keys(line, "the new line")
    return line


def _scopes(text: str) -> list[str]:
    scopes = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in scopes if s not in SCOPES]
    if not scopes or unknown:
        raise argparse.ArgumentTypeError(f"scopes are a comma-separated list of {', '.join(SCOPES)}")
    return scopes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.keys", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("new", "mint a new key"), ("hash", "the line for a key read on stdin")):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--name", required=True, help="who holds the key (shown in logs and metrics)")
        sub.add_argument("--scopes", required=True, type=_scopes, help=f"comma-separated: {', '.join(SCOPES)}")
    check = commands.add_parser("check", help="parse a keys file as the service does")
    check.add_argument("file")
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            with open(args.file) as fh:
                keys = parse_keys(fh.read(), args.file)
            print(f"{args.file}: {len(keys)} keys: {', '.join(sorted(p.name for p in keys.values()))}")
            return 0 if keys else 1
        key = new_key() if args.command == "new" else sys.stdin.readline().strip()
        if not key:
            parser.error("no key on stdin")
        line = key_line(args.name, args.scopes, key)
    except (KeyFileError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.command == "new":
        print(f"key (shown once; give it to {args.name}, store it as a secret): {key}")
        print(f"line for BANKCHURN_API_KEYS_FILE: {line}")
    else:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
