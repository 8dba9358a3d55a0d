"""Key management from a shell (the admin API does the same over HTTP: ``/v1/admin/keys``).

    python -m serve_app.admin keys create --user alice [--admin] [--name laptop]
    python -m serve_app.admin keys list
    python -m serve_app.admin keys revoke <key id>
    python -m serve_app.admin bootstrap          # `make run` does this: the first admin key and the chat link

Keys go to the keys file (``auth.keys_file``, default ``.chatserve/keys.json`` in the project), or to
Redis with ``--redis URL`` (what ``store: redis`` deployments read). A new key is printed once; only
its hash is stored. ``bootstrap`` makes an admin key when there is none, keeps it readable only by
you in ``.chatserve/admin.key``, and prints the chat page's link with it, as Jupyter prints its token.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from engines.artifacts import PROJECT_ROOT

from .config import AuthSettings
from .ingress.keys import FileKeyStore, KeyStore, RedisKeyStore, key_id_of, new_key, revoke, verify
from .redis_client import connect

ADMIN_KEY_FILE = PROJECT_ROOT / ".chatserve" / "admin.key"


def _stores(args) -> list[KeyStore]:
    if args.redis:
        return [RedisKeyStore(connect(args.redis), args.prefix)]
    return [FileKeyStore(Path(args.keys_file))]


async def _run(args) -> int:
    stores = _stores(args)
    try:
        if args.command == "bootstrap":
            return await _bootstrap(stores[0], args.url)
        if args.action == "create":
            key, record = new_key(args.user, args.admin, args.name, requests_per_min=args.requests_per_min,
                                  tokens_per_min=args.tokens_per_min, max_concurrent_replies=args.max_concurrent_replies)
            await stores[0].put(record)
            print(f"key for {record.user}{' (admin)' if record.admin else ''}, id {record.id}; shown once, keep it:")
            print(key)
        elif args.action == "list":
            for r in sorted(await stores[0].all(), key=lambda r: r.created_at):
                state = "revoked" if r.revoked_at else "active"
                print(f"{r.id}  {r.user:<20} {'admin' if r.admin else 'user ':<6} {state:<8} {r.name or ''}")
        elif args.action == "revoke":
            if not await revoke(args.key_id, stores):
                print(f"no key {args.key_id}", file=sys.stderr)
                return 1
            print(f"revoked {args.key_id}")
        return 0
    finally:
        for store in stores:
            if isinstance(store, RedisKeyStore):
                await store.redis.aclose()


async def _bootstrap(store: KeyStore, url: str) -> int:
    key = ADMIN_KEY_FILE.read_text().strip() if ADMIN_KEY_FILE.exists() else None
    record = await verify(key, [store]) if key and key_id_of(key) else None
    if record is None or not record.admin:
        key, record = new_key("admin", admin=True, name="made by make run")
        await store.put(record)
        ADMIN_KEY_FILE.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(ADMIN_KEY_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
    print(f"""
  chatserve needs an API key for every request. Yours (admin; also in {ADMIN_KEY_FILE}):
      {key}
  Chat page, signed in:  {url}/#key={key}
  Ops page:              {url}/ops#key={key}
  OpenAI SDK:            OpenAI(base_url="{url}/v1", api_key="<the key>")
  More keys:             .venv/bin/python -m serve_app.admin keys create --user <name>
""")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve_app.admin", description=__doc__.splitlines()[0])
    parser.add_argument("--keys-file", default=str(PROJECT_ROOT / AuthSettings().keys_file), help="the keys file")
    parser.add_argument("--redis", help="manage the keys in this Redis instead (store: redis deployments)")
    parser.add_argument("--prefix", default="chatserve:", help="the deployment's dialogue.redis_key_prefix")
    commands = parser.add_subparsers(dest="command", required=True)
    keys = commands.add_parser("keys").add_subparsers(dest="action", required=True)
    create = keys.add_parser("create")
    create.add_argument("--user", required=True)
    create.add_argument("--admin", action="store_true", help="may use /ops and manage keys")
    create.add_argument("--name", help="a note: what the key is for")
    for limit in ("requests-per-min", "tokens-per-min", "max-concurrent-replies"):
        create.add_argument(f"--{limit}", type=int, help=f"this key's own {limit} (default: args.limits)")
    keys.add_parser("list")
    keys.add_parser("revoke").add_argument("key_id")
    commands.add_parser("bootstrap").add_argument("--url", default="http://localhost:8000")
    return asyncio.run(_run(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
