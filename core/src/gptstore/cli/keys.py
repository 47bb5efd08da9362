"""``gptstore key``: make API keys, and the ``sha256:`` hashes that config.toml may hold
instead of the keys themselves."""

from __future__ import annotations

import secrets
import sys

import click

from gptstore.cli.base import cli, emit_json, err
from gptstore.errors import GptstoreError


@cli.group()
def key() -> None:
    """Make API keys for [server] api_keys, and their hashes."""


@key.command("hash")
def key_hash() -> None:
    """Print a key's sha256:<hex> (key from stdin, or asked for, hidden).

    config.toml may hold { key = "sha256:<hex>", role = "user" } in [server] api_keys instead
    of the key: clients still send the key itself, and no secret sits in the file.
    Example: printf %s "$KEY" | gptstore key hash
    """
    from gptstore.server.settings import HASH_PREFIX, hash_key, key_problem

    if sys.stdin.isatty():
        secret = click.prompt("API key", hide_input=True, confirmation_prompt=True, err=True)
    else:
        secret = sys.stdin.read().removesuffix("\n").removesuffix("\r")  # `echo` adds a newline
    if not secret:
        raise GptstoreError(
            'no key on stdin: pipe the key in, e.g. printf %s "$KEY" | gptstore key hash'
        )
    if secret[: len(HASH_PREFIX)].lower() == HASH_PREFIX:
        raise GptstoreError(
            f"that is a hash already ({HASH_PREFIX}...): give the key itself, as clients send it"
        )
    problem = key_problem(secret)
    if problem:
        raise GptstoreError(problem)
    click.echo(hash_key(secret))


@key.command("new")
@click.option(
    "--role",
    type=click.Choice(["user", "admin"]),
    default="user",
    show_default=True,
    help="user: inference and reading the store; admin: also changes state.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def key_new(role: str, as_json: bool) -> None:
    """Make a random key; print it and an api_keys entry with its hash.

    The key is printed once and kept nowhere: give it to its client now. The entry goes in
    [server] api_keys of config.toml (or of the file given to `gptstore serve --config`).
    """
    from gptstore.server.settings import hash_key

    secret = secrets.token_urlsafe(32)
    hashed = hash_key(secret)
    entry = f'{{ key = "{hashed}", role = "{role}" }}'
    if as_json:
        emit_json({"key": secret, "sha256": hashed, "role": role, "entry": entry})
        return
    click.echo(f"key:   {secret}")
    click.echo(f"entry: {entry}")
    err.print("the key is shown only this once; add the entry to [server] api_keys")
